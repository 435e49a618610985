"""Many overlay nodes on loopback in one process (each on its own 127.x.y.z), with the real
signature check and the real sandbox verifier, and hostile peers speaking raw UDP and TCP."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from overlay import mpack, wire
from overlay.broadcast import BroadcastConfig, Outcome
from overlay.dht import MAX_DATAGRAM, DhtConfig
from overlay.hello import make_hello
from overlay.node import Overlay, OverlayConfig, PublishError
from sca.alert import Alert, ByteRef, ExecutionControl, Message
from sca.codec import FormatError, decode_alert, encode_alert
from sca.envelope import decode_envelope, seal
from sca.keys import NodeKey
from sca.verify import Verifier

PORT = 7400


def addr(prefix: int, i: int) -> tuple[str, int]:
    return f"127.{prefix}.{i // 250}.{i % 250 + 1}", PORT


def checking_signatures(verifier: Verifier) -> Callable[[bytes, Alert], asyncio.Future[Any]]:
    """An ``Overlay(verify_envelope=...)``: the signature, then the sandbox, the verdict as a
    future that is done a moment later (as a worker process's answer would be)."""
    def verify_envelope(body: bytes, alert: Alert) -> asyncio.Future[Any]:
        try:
            decode_envelope(body).check()
            verdict: Any = verifier.verify(alert)
        except FormatError:
            verdict = Outcome.FORGED
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, verdict)
        return fut
    return verify_envelope


class Net:
    def __init__(self, prefix: int, n: int, verifier: Verifier,
                 signature_by_verifier: bool = False, **kw: Any) -> None:
        self.prefix = prefix
        self.got: list[dict[bytes, int]] = [{} for _ in range(n)]
        self.nodes: list[Overlay] = []
        for i in range(n):
            def on_alert(envelope: Any, alert: Any, i: int = i) -> None:
                aid = hashlib.sha256(envelope.alert_bytes).digest()
                self.got[i][aid] = self.got[i].get(aid, 0) + 1
                assert isinstance(alert, Alert)
            boot = [] if i == 0 else [f"{addr(prefix, 0)[0]}:{PORT}"]
            verify: dict[str, Any] = (
                {"verify_envelope": checking_signatures(verifier)} if signature_by_verifier
                else {"verify": verifier.verify})
            self.nodes.append(Overlay(NodeKey.generate(), bind=addr(prefix, i), bootstrap=boot,
                                      on_alert=on_alert, **verify, **kw))
        self.dead: set[int] = set()

    async def start(self, concurrency: int = 16) -> None:
        await self.nodes[0].start(join=False)
        sem = asyncio.Semaphore(concurrency)

        async def one(node: Overlay) -> None:
            async with sem:
                await node.start()
        await asyncio.gather(*(one(n) for n in self.nodes[1:]))

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes))

    async def kill(self, idxs: Sequence[int]) -> None:
        self.dead.update(idxs)
        await asyncio.gather(*(self.nodes[i].stop() for i in idxs))

    def live(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    async def wait_all(self, aid: bytes, publisher: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(aid in self.got[i] for i in self.live() if i != publisher):
                return
            await asyncio.sleep(0.02)

    def stat(self, key: str, idxs: Sequence[int] | None = None) -> int:
        return sum(self.nodes[i].stats().get(key, 0)
                   for i in (self.live() if idxs is None else idxs))


def aid_of(alert_bytes: bytes) -> bytes:
    return hashlib.sha256(alert_bytes).digest()


# --- the happy path, with dead nodes ---------------------------------------------------------


def test_every_live_node_gets_a_verified_alert(prefix, alerts, verifier, run, trouble) -> None:
    async def main() -> None:
        net = Net(prefix, 30, verifier)
        await net.start()
        try:
            assert min(len(n.peers()) for n in net.nodes) >= 10
            publisher = 7
            env = seal(alerts[0], net.nodes[publisher].key, time.time()).encode()
            aid = await net.nodes[publisher].publish(env)
            assert aid == aid_of(alerts[0])
            await net.wait_all(aid, publisher)
            assert all(net.got[i].get(aid) == 1 for i in net.live() if i != publisher)
            assert aid not in net.got[publisher]  # no on_alert for its own alert
            # 10% die without a word; the next alert still reaches everyone alive.
            await net.kill([3, 12, 25])
            env2 = seal(alerts[1], net.nodes[0].key, time.time()).encode()
            aid2 = await net.nodes[20].publish(env2)
            await net.wait_all(aid2, 20)
            assert all(aid2 in net.got[i] for i in net.live() if i != 20)
            # Their ports answer ICMP "unreachable": the broadcast passed them over at once.
            assert net.stat("bcast.unreachable") > 0
            # Publishing again is a no-op; the network does not send it around again.
            before = net.stat("dht.tx_0x10")
            assert await net.nodes[20].publish(env2) == aid2
            assert net.stat("dht.tx_0x10") == before
            assert net.stat("dht.handler_errors") == 0
        finally:
            await net.stop()
    run(main())
    assert trouble.errors() == []
    assert any("receive buffer" in r.getMessage() for r in trouble.records) or True


def test_icmp_unreachable_is_reported_and_costs_no_datagram(prefix, verifier, run) -> None:
    import socket
    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start(join=False)
        live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        live.bind(addr(prefix, 1))
        live.setblocking(False)
        heard: list[tuple[str, int]] = []
        protocol = node.server.protocol
        assert protocol is not None
        protocol.on_unreachable = heard.append
        try:
            for k in range(3):  # nobody listens at these
                protocol.send_datagram(b"\x12" + bytes([wire.VERSION, k]), addr(prefix, 2 + k))
            # The kernel reports the first one's error on the next send: that datagram still
            # goes out.
            protocol.send_datagram(b"\x12" + bytes([wire.VERSION, 9]), addr(prefix, 1))
            await asyncio.sleep(0.1)
            assert live.recv(100)[2] == 9
            assert sorted(heard) == [addr(prefix, 2 + k) for k in range(3)]
        finally:
            live.close()
            await node.stop()
    run(main())


def test_rcvbuf_is_raised_and_logged(prefix, verifier, run, caplog) -> None:
    import logging
    caplog.set_level(logging.INFO, logger="overlay.dht")

    async def main() -> int:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start()
        try:
            return node.server.rcvbuf_in_effect
        finally:
            await node.stop()
    size = run(main())
    assert size >= 4 << 20  # root here: SO_RCVBUFFORCE goes past rmem_max
    assert "receive buffer 4194304 bytes in effect" in caplog.text


def test_publish_refuses_what_does_not_verify_here(prefix, alerts, verifier, run) -> None:
    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start()
        try:
            with pytest.raises(PublishError):
                await node.publish(b"not an envelope")
            with pytest.raises(PublishError):
                await node.publish(seal(dressed_up(alerts[0]), node.key, time.time()).encode())
        finally:
            await node.stop()
    run(main())


# --- hostile peers ---------------------------------------------------------------------------


def dressed_up(alert_bytes: bytes) -> bytes:
    """A benign message dressed up as an alert for the same service: it cannot verify."""
    real = decode_alert(alert_bytes)
    benign = Message(b"\x04MSSQLSERVER\x00")
    return encode_alert(Alert(real.service_id, real.service_name, (benign,),
                              ExecutionControl((ByteRef(0, 1), ByteRef(0, 2), ByteRef(0, 3)))))


class Hostile:
    """A peer that speaks the wire formats by hand: announces whatever it likes from its UDP
    socket and serves whatever bodies it likes over TCP."""

    def __init__(self, host: str, bodies: dict[bytes, bytes]) -> None:
        self.host = host
        self.bodies = bodies
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.server: asyncio.AbstractServer | None = None
        self.fetches = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        outer = self

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, a: Any) -> None:
                outer.received.append(data)

        self.transport, _ = await loop.create_datagram_endpoint(P, local_addr=(self.host, PORT))

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                req = await reader.readexactly(wire.FETCH_REQUEST_LEN)
                self.fetches += 1
                aid, _ = wire.decode_fetch_request(req)
                writer.write(wire.encode_fetch_reply(self.bodies.get(aid)))
                await writer.drain()
            except Exception:
                pass
            finally:
                writer.close()
        self.server = await asyncio.start_server(serve, self.host, PORT)

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def stop(self) -> None:
        if self.transport:
            self.transport.close()
        if self.server:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("signature_by_verifier", [False, True])
def test_bogus_and_forged_alerts_are_refuted_never_forwarded(prefix, alerts, verifier, run,
                                                             trouble,
                                                             signature_by_verifier) -> None:
    async def main() -> None:
        told: list[tuple[str, float]] = []  # every node's on_ban
        net = Net(prefix, 12, verifier, signature_by_verifier,
                  on_ban=lambda ip, s: told.append((ip, s)))
        await net.start()
        liar_key = NodeKey.generate()
        bogus = seal(dressed_up(alerts[0]), liar_key, time.time()).encode()
        bogus_id = aid_of(dressed_up(alerts[0]))
        good = seal(alerts[2], liar_key, time.time()).encode()
        forged = bytearray(good)
        forged[good.find(decode_envelope(good).signature) + 3] ^= 0x40  # inside the signature
        good_id = aid_of(alerts[2])
        hostile = Hostile(f"127.{prefix}.9.9", {bogus_id: bogus, good_id: bytes(forged)})
        await hostile.start()
        try:
            honest = net.live()
            before = net.stat("bcast.tx_announce")
            # A bogus alert with a good signature: fetched, refuted by every sandbox.
            for n in net.nodes:
                hostile.send(wire.encode(wire.Announce(bogus_id, 0)), n.address)
            await asyncio.sleep(1.0)
            assert all(net.nodes[i].status(bogus_id) == "refuted" for i in honest)
            assert not any(bogus_id in g for g in net.got)
            # ...and forwarded by nobody: no honest node announced anything.
            assert net.stat("bcast.tx_announce") == before
            # Told again, nobody fetches again.
            fetches = hostile.fetches
            for n in net.nodes:
                hostile.send(wire.encode(wire.Announce(bogus_id, 0)), n.address)
            await asyncio.sleep(0.3)
            assert hostile.fetches == fetches
            # A forged envelope for a real alert: refused, but the id is not poisoned.
            for n in net.nodes:
                hostile.send(wire.encode(wire.Announce(good_id, 0)), n.address)
            await asyncio.sleep(1.0)
            assert net.stat("bcast.forged") == len(honest)
            assert not any(good_id in g for g in net.got)
            assert all(net.nodes[i].status(good_id) is None for i in honest)
            # One more lie (a "not here" for an id it announced: it is no contact of theirs,
            # so the lie is its own) and the liar is banned.
            for n in net.nodes:
                hostile.send(wire.encode(wire.Announce(b"\x55" * 32, 0)), n.address)
            await asyncio.sleep(0.5)
            assert net.stat("bcast.bans") == len(honest)
            assert told == [(hostile.host, BroadcastConfig().ban_s)] * len(honest)
            # From now on its datagrams are dropped before parsing, and it cannot fetch.
            received = net.stat("bcast.rx_announce")
            for k in range(200):
                for n in net.nodes:
                    hostile.send(wire.encode(wire.Announce(k.to_bytes(32, "big"), 0)),
                                 n.address)
            await asyncio.sleep(0.5)
            assert net.stat("bcast.rx_announce") == received
            if all(n.server.kernel_filter for n in net.nodes):
                # The kernel's socket filter drops them: they never reach the process.
                assert net.stat("dht.drop_banned") == 0
            else:
                assert net.stat("dht.drop_banned") >= 200 * len(honest) * 0.9
            # The real alert, from an honest node, still reaches everyone.
            real = seal(alerts[2], net.nodes[4].key, time.time()).encode()
            await net.nodes[4].publish(real)
            await net.wait_all(good_id, 4)
            assert all(good_id in net.got[i] for i in honest if i != 4)
        finally:
            await hostile.stop()
            await net.stop()
    run(main())
    assert trouble.errors() == []


def test_a_flood_of_announcements_is_rate_limited(prefix, verifier, run, trouble) -> None:
    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start()
        hostile = Hostile(f"127.{prefix}.9.8", {})
        await hostile.start()
        try:
            rng = random.Random(3)
            for _ in range(1000):
                hostile.send(wire.encode(wire.Announce(rng.randbytes(32), 0)), node.address)
            await asyncio.sleep(1.0)
            stats = node.stats()
            # The burst of the announcement bucket, at most; everything else was dropped
            # before parsing (by the bucket, the per-peer fetch cap, then the ban).
            assert stats.get("bcast.fetches", 0) <= 20
            dropped = (stats.get("bcast.drop_rate", 0) + stats.get("dht.drop_banned", 0)
                       + stats.get("bcast.drop_banned", 0)
                       + stats.get("bcast.drop_busy_peer", 0) + stats.get("dht.drop_rate", 0))
            assert dropped >= 950
            # Garbage RPC frames: ten and the address is banned, in the kernel too (nothing
            # more from it reaches the process).
            sock = _udp((f"127.{prefix}.9.7", 9300))
            for _ in range(12):
                sock.sendto(b"\x00" + bytes(20) + b"\xc1", node.address)
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            rx = node.stats()["dht.rx"]
            dropped_before = node.stats().get("dht.drop_banned", 0)
            for _ in range(100):
                sock.sendto(b"\x00" + bytes(20) + b"\xc1", node.address)
            await asyncio.sleep(0.2)
            sock.close()
            assert node.core is not None
            assert f"127.{prefix}.9.7" in node.core.banned_ips(asyncio.get_running_loop().time())
            if node.server.kernel_filter:
                assert node.stats()["dht.rx"] == rx
                assert node.stats().get("dht.drop_banned", 0) - dropped_before <= 2
        finally:
            await hostile.stop()
            await node.stop()
    run(main())
    assert trouble.errors() == []


def junk(rng: random.Random) -> list[bytes]:
    out = [rng.randbytes(rng.randint(0, 1400)) for _ in range(300)]
    out += [rng.randbytes(MAX_DATAGRAM + rng.randint(1, 3000)) for _ in range(20)]
    frame = b"\x00" + rng.randbytes(20) + mpack.packb(["find_node", [rng.randbytes(20)] * 2])
    out += [frame[:k] for k in range(len(frame))]  # truncated msgpack
    shapes: list[Any] = [
        ["find_node", [1, 2]], ["ping", []], ["ping", [b"\x00" * 21]], ["hello", [b"x", 5, "a"]],
        ["hello", [b"n" * 16, "localhost", 1]], ["hello", [b"n" * 16, "127.0.0.1", 0]],
        ["store", [b"k" * 20, b"k" * 20, b"v"]], ["stun", []], ["find_node", "x"], [1, 2, 3],
        ["find_value", [b"a" * 20, None]], ["__init__", []], ["_accept_request", [1, 2]],
        [["find_node"], []], {"a": 1}, 1.5, "ping", None,
    ]
    for shape in shapes:
        try:
            out.append(b"\x00" + rng.randbytes(20) + mpack.packb(shape))
        except mpack.MpackError:
            import umsgpack  # shapes our codec will not even write
            out.append(b"\x00" + rng.randbytes(20) + umsgpack.packb(shape))
    out.append(b"\x00" + rng.randbytes(20) + b"\x91" * 600)  # deep nesting
    out.append(b"\x00" + rng.randbytes(20) + b"\xdd\xff\xff\xff\xff")  # huge array head
    out += [b"\x01" + rng.randbytes(20) + mpack.packb([[rng.randbytes(20), "1.2.3.4", 5]])
            for _ in range(10)]  # replies nobody asked for
    out += [bytes([k, 1]) + rng.randbytes(rng.randint(0, 40)) for k in (0x10, 0x11, 0x12)
            for _ in range(20)]
    return out


def test_malformed_datagrams_cause_no_crash_and_no_unhandled_errors(prefix, alerts, verifier,
                                                                    run, trouble) -> None:
    async def main() -> None:
        net = Net(prefix, 6, verifier)
        await net.start()
        rng = random.Random(5)
        # One hostile address per batch so the rate limits do not hide the parsing paths.
        try:
            for k, data in enumerate(junk(rng)):
                hostile = (f"127.{prefix}.8.{k % 200 + 1}", 9000)
                sock = senders.get(hostile)
                if sock is None:
                    sock = senders[hostile] = _udp(hostile)
                for n in net.nodes:
                    sock.sendto(data, n.address)
                if k % 50 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            assert net.stat("dht.drop_malformed") > 100
            # Oversized ones never got here (the kernel filter) or were dropped unread.
            assert net.stat("dht.drop_oversize") == 0 or not net.nodes[0].server.kernel_filter
            # The same junk handed straight to the handler, past the kernel and the rate limit.
            protocol = net.nodes[2].server.protocol
            for k, data in enumerate(junk(random.Random(6))):
                protocol.datagram_received(data, (f"127.{prefix}.5.{k % 250 + 1}", 9000))
            assert protocol.stats["drop_oversize"] >= 20
            assert net.stat("dht.handler_errors") == 0
            # Still working: a broadcast reaches everyone.
            env = seal(alerts[3], net.nodes[1].key, time.time()).encode()
            aid = await net.nodes[1].publish(env)
            await net.wait_all(aid, 1)
            assert all(aid in net.got[i] for i in range(6) if i != 1)
        finally:
            for s in senders.values():
                s.close()
            await net.stop()
    senders: dict[tuple[str, int], Any] = {}
    run(main())
    assert trouble.errors() == []


def _udp(bind: tuple[str, int]) -> Any:
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    return s


class HostileDht(asyncio.DatagramProtocol):
    """A peer that passes hello (it has a key) and then answers lookups with garbage."""

    def __init__(self, key: NodeKey, host: str, replies: list[Any]) -> None:
        self.key = key
        self.host = host
        self.replies = replies
        self.k = 0
        self.always_bad = False
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, a: Any) -> None:
        if data[:1] != b"\x00":
            return
        msg_id = data[1:21]
        name, args = mpack.unpackb(data[21:])
        if name == "hello":
            reply: Any = make_hello(self.key, self.host, PORT, args[0], 0).wire()
        elif name == "ping":
            reply = [b"not an id"] if self.k % 2 or self.always_bad else self.key.node_id
        else:
            reply = self.replies[self.k % len(self.replies)]
        self.k += 1
        try:
            payload = mpack.packb(reply)
        except mpack.MpackError:
            payload = reply if isinstance(reply, bytes) else b"\xc1"
        assert self.transport is not None
        self.transport.sendto(b"\x01" + msg_id + payload, a)


def test_hostile_replies_never_raise_out_of_join(prefix, verifier, run, trouble) -> None:
    rng = random.Random(9)
    garbage: list[Any] = [
        None, 5, "x", b"\x00" * 20, [], [None], [[1, 2, 3]], [[b"\x01" * 20, "127.0.0.1"]],
        [[b"\x01" * 19, "127.0.0.1", 1]], [[b"\x01" * 20, "not-an-ip", 1]],
        [[b"\x01" * 20, "127.0.0.1", -1]], [[b"\x01" * 20, "127.0.0.1", 70000]],
        [[b"\x01" * 20, "127.0.0.1", 7400]] * 25, [[[[[]]]]],
        [[rng.randbytes(20), "127.0.0.1", 7400] for _ in range(20)],  # addresses nobody has
        b"\xc1", b"\x92\x93",  # raw bytes: not msgpack at all, truncated
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        net = Net(prefix, 5, verifier)
        await net.start()
        hkey = NodeKey.generate()
        hhost = f"127.{prefix}.7.7"
        transport, proto = await loop.create_datagram_endpoint(
            lambda: HostileDht(hkey, hhost, garbage), local_addr=(hhost, PORT))
        try:
            newcomer = Overlay(NodeKey.generate(), bind=addr(prefix, 50),
                               bootstrap=[f"{hhost}:{PORT}", f"{addr(prefix, 0)[0]}:{PORT}"],
                               verify=verifier.verify)
            await newcomer.start()
            assert proto.k > 0  # it was asked, and answered garbage
            ids = {p.node_id for p in newcomer.peers()}
            assert {n.node_id for n in net.nodes} <= ids
            assert newcomer.stats().get("dht.bad_replies", 0) > 0
            assert newcomer.stats().get("dht.handler_errors", 0) == 0
            # Three garbage answers in a row and the hostile peer is out of the table.
            from kademlia.node import Node
            proto.always_bad = True
            hostile_node = Node(hkey.node_id, hhost, PORT)
            protocol = newcomer.server.protocol
            protocol.misses.pop(hkey.node_id, None)  # misses during the join: start afresh
            protocol.router.add_contact(hostile_node)  # its hello did check out
            for _ in range(2):
                await newcomer.server.protocol.call_ping(hostile_node)
            assert hkey.node_id in {p.node_id for p in newcomer.peers()}  # two misses: kept
            await newcomer.server.protocol.call_ping(hostile_node)
            assert hkey.node_id not in {p.node_id for p in newcomer.peers()}
            await newcomer.stop()
        finally:
            transport.close()
            await net.stop()
    run(main())
    assert trouble.errors() == []


def test_datagrams_forged_in_a_peers_name_neither_ban_nor_evict_it(prefix, alerts, verifier,
                                                                     run, trouble) -> None:
    """Anyone can put a peer's address on a datagram (here: a socket on the peer's own IP, the
    same to the receiver as a forged source): junk in its name, a flood, and pings claiming
    its id from elsewhere whose hellos go unanswered cost the peer nothing; its next alert
    arrives."""
    async def main() -> None:
        net = Net(prefix, 2, verifier)
        await net.start()
        a, b = net.nodes
        spoof = _udp((a.address[0], 0))  # a's IP, another port
        elsewhere = [_udp((f"127.{prefix}.7.7", 9300 + k)) for k in range(3)]
        try:
            await asyncio.sleep(0.2)
            assert [p.node_id for p in b.peers()] == [a.key.node_id]
            for k in range(5):
                spoof.sendto(bytes((0x10, wire.VERSION)) + b"junk" * k, b.address)
                spoof.sendto(b"\x00" + bytes(20) + b"\xc1", b.address)  # a bad RPC frame
            for _ in range(300):
                spoof.sendto(b"\x00" + bytes(20) + mpack.packb(["ping", [b"\x07" * 20]]),
                             b.address)
            for k, sock in enumerate(elsewhere):  # a's id claimed from three other addresses
                sock.sendto(b"\x00" + bytes([k]) * 20 + mpack.packb(["ping", [a.key.node_id]]),
                            b.address)
            await asyncio.sleep(2.5)  # the hellos to "elsewhere" time out
            stats = b.stats()
            assert stats.get("bcast.bans", 0) == 0 and stats.get("dht.abusers", 0) == 0
            assert stats.get("dht.abuse_spared", 0) >= 1 and stats["dht.hello_timeout"] >= 1
            assert [p.node_id for p in b.peers()] == [a.key.node_id]

            async def trickle() -> None:  # junk in a's name all along, 50 a second
                while True:
                    spoof.sendto(b"\x00" + bytes(20) + b"\xc1", b.address)
                    await asyncio.sleep(0.02)
            junk = asyncio.ensure_future(trickle())
            try:
                await asyncio.sleep(1.0)
                aid = await a.publish(seal(alerts[0], a.key, time.time()).encode())
                await net.wait_all(aid, 0, timeout=5)
                assert aid in net.got[1]
                assert [p.node_id for p in b.peers()] == [a.key.node_id]
                # Junk in a peer's name costs a datagram each, not a surcharge: nothing of a's
                # own traffic was dropped as over its rate.
                assert b.stats().get("dht.drop_rate", 0) == 0
            finally:
                junk.cancel()
        finally:
            for sock in (spoof, *elsewhere):
                sock.close()
            await net.stop()
    run(main())
    assert trouble.errors() == []


def test_ids_need_a_hello_and_one_address_gets_few(prefix, verifier, run, trouble) -> None:
    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start()
        host = f"127.{prefix}.6.6"
        try:
            # 300 made-up ids pinging from one address that cannot answer a hello.
            sock = _udp((host, 9100))
            rng = random.Random(2)
            for _ in range(300):
                sock.sendto(b"\x00" + rng.randbytes(20)
                            + mpack.packb(["ping", [rng.randbytes(20)]]), node.address)
            await asyncio.sleep(0.5)
            sock.close()
            assert node.peers() == []
            # Real nodes with real keys, many on one IP (different ports): two get in.
            others = [Overlay(NodeKey.generate(), bind=(host, 9200 + k),
                              bootstrap=[f"{node.address[0]}:{PORT}"], verify=verifier.verify)
                      for k in range(6)]
            for o in others:
                await o.start()
            await asyncio.sleep(0.3)
            assert len(node.peers()) == 2
            for o in others:
                await o.stop()
        finally:
            await node.stop()
    run(main())
    assert trouble.errors() == []


def test_store_and_pickle_state_are_disabled(prefix, verifier, run) -> None:
    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify)
        await node.start()
        try:
            with pytest.raises(NotImplementedError):
                await node.server.set("k", "v")
            with pytest.raises(NotImplementedError):
                await node.server.get("k")
            with pytest.raises(NotImplementedError):
                node.server.save_state("/tmp/x")
            with pytest.raises(AttributeError):  # no more RPCs out of thin air
                node.server.protocol.anything_at_all  # noqa: B018
        finally:
            await node.stop()
    run(main())


def test_extra_rpcs_answer_authenticated_peers_only(prefix, verifier, run, trouble) -> None:
    """An RPC served by another part of the node (traceback's query) answers peers whose hello
    checked out, rejects malformed arguments, and says nothing to an unknown address."""
    def check(args: list[Any]) -> tuple[Any, ...] | None:
        return (args[0],) if len(args) == 1 and type(args[0]) is bytes else None

    async def main() -> None:
        net = Net(prefix, 3, verifier)
        await net.start()
        asked: list[tuple[str, int]] = []

        def echo(sender: tuple[str, int], blob: bytes) -> bytes:
            asked.append(sender)
            return blob[::-1]
        try:
            net.nodes[0].serve_rpc("echo", check, echo)
            with pytest.raises(ValueError):
                net.nodes[0].serve_rpc("echo", check, echo)
            assert await net.nodes[1].call_rpc(addr(prefix, 0), "echo", b"abc") == b"cba"
            assert asked == [addr(prefix, 1)]
            # a stranger speaking raw UDP gets no answer (it never said hello)
            loop = asyncio.get_running_loop()
            got: list[bytes] = []
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Collect(got), local_addr=addr(prefix, 40))
            transport.sendto(b"\x00" + bytes(20) + mpack.packb(["echo", [b"abc"]]),
                             addr(prefix, 0))
            await asyncio.sleep(0.3)
            transport.close()
            assert not [g for g in got if g[:1] == b"\x01" and b"cba" in g]
            assert asked == [addr(prefix, 1)]
            assert net.nodes[0].stats()["dht.rx_rpc_unauthenticated"] >= 1
            # a malformed argument list is not served either
            assert await net.nodes[1].call_rpc(addr(prefix, 0), "echo", 5, attempts=1) is None
        finally:
            await net.stop()
    run(main())
    assert trouble.errors() == []


def test_a_strict_chain_carries_the_alert_to_its_end(prefix, alerts, verifier, run,
                                                    trouble) -> None:
    """Five nodes in a line, each hearing only its neighbours (everyone else's datagrams are
    dropped on receipt, as if unroutable) and joined through its predecessor: the alert
    reaches the end through three verifying relays, with anti-entropy out of reach."""
    cfg = OverlayConfig(dht=DhtConfig(rpc_timeout=0.5),
                        broadcast=BroadcastConfig(ae_interval=1000.0))

    async def main() -> None:
        n = 5
        got: list[set[bytes]] = [set() for _ in range(n)]
        nodes = [Overlay(NodeKey.generate(), bind=addr(prefix, i), verify=verifier.verify,
                         on_alert=lambda e, a, i=i: got[i].add(aid_of(e.alert_bytes)),
                         config=cfg) for i in range(n)]
        try:
            loop = asyncio.get_running_loop()
            for i, node in enumerate(nodes):
                await node.start(join=False)
                assert node.server.protocol is not None and node.core is not None
                near = {addr(prefix, j)[0] for j in (i - 1, i + 1) if 0 <= j < n}
                node.server.protocol.banned = (
                    lambda ip, near=near, core=node.core:
                    ip not in near or core.banned(ip, loop.time()))
            await asyncio.gather(*(nodes[i].join([f"{addr(prefix, i - 1)[0]}:{PORT}"])
                                   for i in range(1, n)))
            for i, node in enumerate(nodes):
                assert sorted(p.addr[0] for p in node.peers()) == sorted(
                    addr(prefix, j)[0] for j in (i - 1, i + 1) if 0 <= j < n)
            aid = await nodes[0].publish(seal(alerts[2], nodes[0].key, time.time()).encode())
            end = time.monotonic() + 5
            while time.monotonic() < end and aid not in got[-1]:
                await asyncio.sleep(0.02)
            assert all(aid in got[i] for i in range(1, n))
            assert sum(x.stats().get("bcast.ae_rounds", 0) for x in nodes) == 0
        finally:
            await asyncio.gather(*(x.stop() for x in nodes))
    run(main())
    assert trouble.errors() == []


@pytest.mark.parametrize("push", [True, False])
def test_handed_over_waits_for_the_fetches_it_invited(prefix, alerts, verifier, run,
                                                       trouble, push: bool) -> None:
    """``handed_over`` returns once every contact the alert was announced to has fetched it
    (or taken the body pushed along, or answered), and gives up at its timeout on a contact
    that never answers."""
    async def main() -> None:
        cfg = OverlayConfig(broadcast=BroadcastConfig(
            push_bytes=BroadcastConfig().push_bytes if push else 0))
        net = Net(prefix, 3, verifier, config=cfg)
        await net.start()
        try:
            origin = net.nodes[0]
            env = seal(alerts[0], origin.key, time.time()).encode()
            assert len(env) < wire.MAX_DATAGRAM - 300  # small enough to ride along
            aid = await origin.publish(env)
            assert await origin.handed_over(aid, 5.0) is True
            assert not origin._handoffs  # nothing left waiting
            stats = origin.stats()
            announced = stats["bcast.tx_announce"]
            assert announced >= 1
            # Every announcement was taken by the time it returned (nobody had it before):
            # its body fetched, or acknowledged when it rode along.
            assert stats.get("bcast.fetch_served", 0) == (0 if push else announced)
            assert stats.get("bcast.rx_ack", 0) == (announced if push else 0)
            # A contact that drops our datagrams unread: no fetch, no answer, no ICMP.
            mute = net.nodes[2].server.protocol
            assert mute is not None
            mute.banned = lambda ip: ip == addr(prefix, 1)[0]
            relay = net.nodes[1]
            aid2 = await relay.publish(seal(alerts[1], relay.key, time.time()).encode())
            t = time.monotonic()
            assert await relay.handed_over(aid2, 0.05) is False
            assert time.monotonic() - t < 1.0
            assert not relay._handoffs
            # Stopping ends a wait at once, with False.
            waiting = asyncio.ensure_future(relay.handed_over(aid2, 30.0))
            await asyncio.sleep(0.01)
            await relay.stop()
            assert await asyncio.wait_for(waiting, 1.0) is False
        finally:
            await net.stop()
    run(main())
    assert trouble.errors() == []


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, got: list[bytes]) -> None:
        self.got = got

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


def test_neighbour_cache_lets_a_restarted_node_rejoin(prefix, verifier, run, tmp_path) -> None:
    async def main() -> None:
        net = Net(prefix, 6, verifier)
        await net.start()
        key = NodeKey.generate()
        try:
            node = Overlay(key, bind=addr(prefix, 30), bootstrap=[f"{addr(prefix, 0)[0]}:{PORT}"],
                           verify=verifier.verify, state_dir=tmp_path)
            await node.start()
            assert len(node.peers()) == 6
            await node.stop()
            assert (tmp_path / "neighbours.json").exists()
            again = Overlay(key, bind=addr(prefix, 30), verify=verifier.verify,
                            state_dir=tmp_path)  # no bootstrap peers at all
            await again.start()
            assert len(again.peers()) == 6
            await again.stop()
        finally:
            await net.stop()
    run(main())


def test_cannot_verify_nodes_hold_nothing_and_super_peers_relay(prefix, alerts, verifier, run,
                                                               trouble) -> None:
    """Nodes without the service's image (their verifier knows no services) never deliver or
    forward; nodes running it get it through the super-peers and each other."""
    blind = Verifier([])

    async def main() -> None:
        n = 24
        got: list[set[bytes]] = [set() for _ in range(n)]
        runs_it = set(range(0, n, 3))  # a third run the service
        supers = {1, 2}
        nodes = []
        for i in range(n):
            v = verifier if (i in runs_it or i in supers) else blind
            boot = [] if i == 0 else [f"{addr(prefix, 0)[0]}:{PORT}"]
            nodes.append(Overlay(
                NodeKey.generate(), bind=addr(prefix, i), bootstrap=boot, verify=v.verify,
                on_alert=lambda e, a, i=i: got[i].add(aid_of(e.alert_bytes)),
                super_peer=i in supers))
        await nodes[0].start(join=False)
        for node in nodes[1:]:
            await node.start()
        try:
            aid = await nodes[3].publish(seal(alerts[4], nodes[3].key, time.time()).encode())
            end = time.monotonic() + 8
            want = (runs_it | supers) - {3}
            while time.monotonic() < end and not all(aid in got[i] for i in want):
                await asyncio.sleep(0.05)
            assert all(aid in got[i] for i in want)
            others = set(range(n)) - runs_it - supers
            assert not any(aid in got[i] for i in others)
            assert all(nodes[i].stats().get("bcast.tx_announce", 0) == 0 for i in others)
            assert all(nodes[i].status(aid) in (None, "cannot-verify") for i in others)
        finally:
            await asyncio.gather(*(x.stop() for x in nodes))
    run(main())
    assert trouble.errors() == []


@pytest.mark.slow
def test_many_processes(alerts, prefix) -> None:
    """Nodes in three worker processes (the benchmark's worker mode): everyone alive gets a
    verified alert, also with dead nodes."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_overlay.py"
    spec = importlib.util.spec_from_file_location("bench_overlay", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_overlay"] = bench
    spec.loader.exec_module(bench)
    key = NodeKey.generate()

    async def main() -> None:
        cluster = bench.ProcCluster(3, 12, prefix, 12)
        try:
            await cluster.join()
            rng = random.Random(1)
            first = await bench.scenario(cluster, "dead0",
                                         seal(alerts[0], key, time.time()).encode(), rng)
            assert first.coverage == 1.0
            await cluster.kill([4, 17, 30])
            second = await bench.scenario(cluster, "dead10",
                                          seal(alerts[1], key, time.time()).encode(), rng)
            assert second.coverage == 1.0
            assert second.msgs_per_node < 10
        finally:
            await cluster.close()
    asyncio.run(main())


def test_replies_to_requests_never_made_count_toward_a_ban(prefix, verifier, run) -> None:
    """A reply to a request id this node never sent is junk (three and the address is banned)
    and costs no parsing; a late reply to a request of ours that timed out is not."""
    cfg = OverlayConfig(dht=DhtConfig(rpc_timeout=0.2))

    async def main() -> None:
        node = Overlay(NodeKey.generate(), bind=addr(prefix, 0), verify=verifier.verify,
                       config=cfg)
        await node.start(join=False)
        slow, junk = _udp((f"127.{prefix}.9.1", PORT)), _udp((f"127.{prefix}.9.2", PORT))
        slow.settimeout(2.0)
        try:
            assert node.server.protocol is not None
            asked = node.server.protocol.ping(slow.getsockname(), node.node_id)
            request, _ = await asyncio.to_thread(slow.recvfrom, 2000)
            assert (await asked) == (False, None)  # timed out
            slow.sendto(b"\x01" + request[1:21] + mpack.packb(b"\x07" * 20), node.address)
            for _ in range(3):
                junk.sendto(b"\x01" + random.randbytes(20) + mpack.packb(b"\x07" * 20),
                            node.address)
            await asyncio.sleep(0.3)
            stats = node.stats()
            assert stats.get("dht.rx_late_response") == 1
            assert stats.get("dht.rx_unexpected_response") == 3
            assert node.core is not None
            now = asyncio.get_running_loop().time()
            assert node.core.banned(junk.getsockname()[0], now)
            assert not node.core.banned(slow.getsockname()[0], now)
        finally:
            slow.close()
            junk.close()
            await node.stop()
    run(main())


def test_nodes_that_joined_through_a_peer_knowing_nobody_meet_within_seconds(
        prefix, verifier, run) -> None:
    """A joins through B while B knows nobody else; B meets C only afterwards, so A's join
    could not name C, nor C's A. The early refresh passes introduce them within seconds
    (nodes of a testbed start together); without them, only the first full pass a minute
    later would."""
    async def meet(early: float, wait: float) -> bool:
        cfg = OverlayConfig(dht=DhtConfig(early_refresh_s=early))
        b, a, c = (Overlay(NodeKey.generate(), bind=addr(prefix, i), verify=verifier.verify,
                           bootstrap=[f"{addr(prefix, 0)[0]}:{PORT}"] if i == 1 else [],
                           config=cfg) for i in range(3))
        try:
            await b.start(join=False)
            await a.start()
            await c.start(join=False)
            await b.server.bootstrap([addr(prefix, 2)])
            assert {p.addr for p in a.peers()} == {addr(prefix, 0)}
            end = time.monotonic() + wait
            while time.monotonic() < end:
                if addr(prefix, 2) in {p.addr for p in a.peers()}:
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            await asyncio.gather(*(n.stop() for n in (a, b, c)))

    assert run(meet(0.5, 6.0))
    assert not run(meet(0.0, 2.0))


def test_each_overlay_keeps_its_own_schedule_on_a_shared_loop(prefix, verifier, run,
                                                              monkeypatch) -> None:
    """Every node's anti-entropy rounds come on time although all overlays of one loop share
    a single timer of the loop's, which wakes about once per round (never a timer more),
    and a stopped node's rounds come no more."""
    from overlay import node as node_mod
    wakeups = 0
    fire = node_mod._Wakeups._fire

    def counted(self: Any) -> None:
        nonlocal wakeups
        wakeups += 1
        fire(self)
    monkeypatch.setattr(node_mod._Wakeups, "_fire", counted)

    async def main() -> None:
        cfg = OverlayConfig(broadcast=BroadcastConfig(ae_interval=0.2))
        nodes = [Overlay(NodeKey.generate(), bind=addr(prefix, i), verify=verifier.verify,
                         bootstrap=[f"{addr(prefix, 0)[0]}:{PORT}"] if i else [], config=cfg)
                 for i in range(4)]
        try:
            await nodes[0].start(join=False)
            for node in nodes[1:]:
                await node.start()
            await nodes[3].stop()

            def rounds() -> list[int]:
                return [n.stats().get("bcast.ae_rounds", 0) for n in nodes]
            before, woken = rounds(), wakeups
            await asyncio.sleep(1.5)  # 6 rounds each, give or take the jitter
            after = rounds()
            assert all(a - b >= 3 for a, b in zip(after[:3], before[:3], strict=True))
            assert after[3] == before[3]
            # Each round is a deadline; a few more come from acknowledgement timeouts. A
            # timer left running beside the one in use would wake hundreds of times.
            assert wakeups - woken <= 2 * (sum(after) - sum(before)) + 10
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))
    run(main())
