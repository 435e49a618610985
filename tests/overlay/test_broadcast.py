"""The sans-I/O broadcast core, driven by a fake clock: a discrete-event network of cores."""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from overlay import wire
from overlay.broadcast import (
    BroadcastConfig,
    BroadcastCore,
    Contact,
    Deliver,
    Fetch,
    Outcome,
    PublishError,
    Send,
    Unresponsive,
    Verify,
    check_body,
    prefix_len,
)
from overlay.wire import Ack, AckStatus, Announce, IHave
from sca.alert import Alert, ByteRef, ExecutionControl, Message
from sca.codec import encode_alert
from sca.envelope import Envelope, decode_envelope, seal, signed_message
from sca.keys import NodeKey

WALL = 1_800_000_000.0
K = 20


def make_alert(tag: bytes = b"A", service: bytes = b"\x01" * 32) -> bytes:
    alert = Alert(service, "svc", (Message(tag * 40),),
                  ExecutionControl((ByteRef(0, 0), ByteRef(0, 1), ByteRef(0, 2))))
    return encode_alert(alert)


def envelope(tag: bytes = b"A", key: NodeKey | None = None, wall: float = WALL,
             service: bytes = b"\x01" * 32) -> bytes:
    return seal(make_alert(tag, service), key or NodeKey.generate(), wall).encode()


def aid_of(env: bytes) -> bytes:
    return hashlib.sha256(decode_envelope(env).alert_bytes).digest()


def answer(announcement: Send, status: AckStatus) -> bytes:
    """The receiver's acknowledgement of an announcement we sent: its token echoed."""
    ann = wire.decode(announcement.data)
    assert isinstance(ann, Announce)
    return wire.encode(Ack(ann.alert_id, status, ann.token))


@dataclass
class SimNode:
    core: BroadcastCore
    addr: tuple[str, int]
    contacts: list[Contact] = field(default_factory=list)
    dead: bool = False
    delivered: dict[bytes, float] = field(default_factory=dict)
    verify: Callable[[Alert], bool | None] = lambda alert: True
    sent: int = 0


class Net:
    """Cores wired by a fake network: every datagram arrives ``latency`` later; a fetch takes
    two latencies; dead nodes drop everything."""

    def __init__(self, n: int, seed: int = 1, latency: float = 0.001,
                 config: BroadcastConfig | None = None, k: int = K) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.counts: Counter[str] = Counter()
        self.nodes: dict[tuple[str, int], SimNode] = {}
        ids = [self.rng.randbytes(20) for _ in range(n)]
        for i, nid in enumerate(ids):
            addr = (f"10.{i // 250}.{i % 250}.1", 4000)
            node = SimNode(None, addr)  # type: ignore[arg-type]
            node.core = BroadcastCore(nid, lambda node=node: node.contacts, config,
                                      random.Random(seed * 7919 + i), self.now)
            self.nodes[addr] = node
        # A Kademlia-like table: up to k random members of each prefix group.
        everyone = list(self.nodes.values())
        for node in everyone:
            groups: dict[int, list[Contact]] = {}
            me = int.from_bytes(node.core.node_id, "big")
            for other in everyone:
                if other is node:
                    continue
                p = prefix_len(me, int.from_bytes(other.core.node_id, "big"))
                groups.setdefault(p, []).append(Contact(other.core.node_id, other.addr))
            for members in groups.values():
                self.rng.shuffle(members)
                node.contacts.extend(members[:k])
        for node in everyone:
            self.at(node.core.next_deadline(), lambda node=node: self.tick(node))

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, fn))

    def run(self, node: SimNode, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                node.sent += 1
                self.counts[f"dgram_{a.data[0]:#x}"] += 1
                self.at(self.now + self.latency,
                        lambda a=a, src=node.addr: self.deliver_datagram(src, a.addr, a.data))
            elif isinstance(a, Fetch):
                self.counts["fetch"] += 1
                node.sent += 1
                self.at(self.now + self.latency,
                        lambda a=a, n=node: self.fetch_arrives(n, a.addr, a.alert_id))
            elif isinstance(a, Verify):
                verdict = node.verify(a.alert)
                self.run(node, node.core.on_verdict(a.alert_id, verdict, self.now))
            elif isinstance(a, Deliver):
                node.delivered[a.alert_id] = self.now
            else:
                assert isinstance(a, Unresponsive)
                self.counts["unresponsive"] += 1
        self.at(node.core.next_deadline(), lambda n=node: self.tick(n))

    def tick(self, node: SimNode) -> None:
        if node.dead:
            return
        if node.core.next_deadline() <= self.now:
            self.run(node, node.core.tick(self.now))
        else:
            self.at(node.core.next_deadline(), lambda: self.tick(node))

    def deliver_datagram(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        node = self.nodes.get(dst)
        if node is None or node.dead:
            return
        self.run(node, node.core.on_datagram(src, data, self.now, WALL + self.now))

    def fetch_arrives(self, requester: SimNode, server_addr: tuple[str, int],
                      alert_id: bytes) -> None:
        server = self.nodes.get(server_addr)
        body = None
        if server is not None and not server.dead and server.core.admit_fetch(
                requester.addr[0], self.now):
            reply = server.core.serve_fetch(
                requester.addr[0], wire.encode_fetch_request(alert_id, requester.addr[1]),
                self.now)
            if reply is not None and reply[0] == wire.FETCH_FOUND:
                body = reply[wire.FETCH_REPLY_HEAD:]

        def back() -> None:
            if not requester.dead:
                self.run(requester, requester.core.on_fetched(
                    alert_id, server_addr, body, self.now, WALL + self.now))
        self.at(self.now + self.latency, back)

    def publish(self, node: SimNode, env: bytes) -> bytes:
        aid, actions = node.core.publish(env, self.now, WALL + self.now)
        self.run(node, actions)
        return aid

    def settle(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            when, _, fn = heapq.heappop(self.events)
            self.now = max(self.now, when)
            fn()
        self.now = until

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if not n.dead]


def coverage(net: Net, origin: SimNode, aid: bytes) -> float:
    others = [n for n in net.live() if n is not origin]
    return sum(aid in n.delivered for n in others) / len(others)


# --- the pieces ---------------------------------------------------------------------------


def test_prefix_len() -> None:
    assert prefix_len(0, 0) == 160
    assert prefix_len(0, 1 << 159) == 0
    assert prefix_len(0, 1) == 159
    assert prefix_len(5 << 100, (5 << 100) | (1 << 99)) == 60


def test_check_body_order_and_outcomes() -> None:
    cfg = BroadcastConfig()
    env = envelope()
    aid = aid_of(env)
    assert check_body(aid, env, WALL, cfg).outcome is None
    assert check_body(b"\x00" * 32, env, WALL, cfg).outcome is Outcome.FORGED
    assert check_body(aid, b"\xa0junk", WALL, cfg).outcome is Outcome.FORGED
    forged = bytearray(env)
    forged[env.find(decode_envelope(env).signature) + 5] ^= 1  # inside the signature
    assert check_body(aid, bytes(forged), WALL, cfg).outcome is Outcome.FORGED
    assert check_body(aid, env, WALL + cfg.max_age_s + 1, cfg).outcome is Outcome.STALE
    assert check_body(aid, env, WALL - cfg.max_skew_s - 1, cfg).outcome is Outcome.STALE


# --- whole networks on the fake clock --------------------------------------------------------


@pytest.mark.parametrize("dead", [0.0, 0.1, 0.3])
def test_tree_reaches_every_live_node(dead: float) -> None:
    net = Net(400, seed=3)
    nodes = list(net.nodes.values())
    origin = nodes[0]
    for n in net.rng.sample(nodes[1:], int(dead * len(nodes))):
        n.dead = True
    env = envelope()
    aid = net.publish(origin, env)
    net.settle(5.0)
    assert coverage(net, origin, aid) == 1.0
    t_last = max(n.delivered[aid] for n in net.live() if n is not origin)
    # Hops of a few milliseconds, plus a chain of 0.3 s timeouts where a copy met dead nodes.
    assert t_last < (0.1 if dead == 0 else 1.0 if dead <= 0.1 else 3.0)
    per_node = sum(n.sent for n in net.live()) / len(net.live())
    assert per_node < 6, net.counts
    # Verify before forward: a node forwards only after its verdict, so nothing arrives twice.
    assert all(len(n.delivered) == 1 for n in net.live() if n is not origin)


def test_message_budget_without_failures() -> None:
    net = Net(1000, seed=5)
    origin = next(iter(net.nodes.values()))
    aid = net.publish(origin, envelope())
    net.settle(3.0)
    assert coverage(net, origin, aid) == 1.0
    per_node = sum(n.sent for n in net.live()) / len(net.live())
    assert per_node <= 6, (per_node, net.counts)


def test_refuted_alert_is_never_forwarded_and_remembered() -> None:
    net = Net(60, seed=9)
    nodes = list(net.nodes.values())
    liar = nodes[0]
    for n in nodes[1:]:
        n.verify = lambda alert: False
    # The liar's own verifier says yes, so it announces; everyone else refutes it.
    env = envelope(b"B")
    aid = net.publish(liar, env)
    net.settle(3.0)
    for n in nodes[1:]:
        assert aid not in n.delivered
        assert n.core.status(aid, net.now) in (Outcome.REFUTED, None)
    refuted = [n for n in nodes[1:] if n.core.status(aid, net.now) is Outcome.REFUTED]
    assert refuted
    # Only the liar ever announced it: refuting nodes forwarded nothing.
    announcers = {n.addr for n in nodes if n.core.stats["tx_announce"]}
    assert announcers == {liar.addr}
    # Told again, a refuting node does not fetch again.
    victim = refuted[0]
    fetches = victim.core.stats["fetches"]
    actions = victim.core.on_datagram(liar.addr, wire.encode(Announce(aid, 0)), net.now, WALL)
    assert victim.core.stats["fetches"] == fetches
    assert [wire.decode(a.data) for a in actions] == [Ack(aid, AckStatus.REFUTED)]


def test_cannot_verify_nodes_do_not_forward_but_super_peers_carry_it() -> None:
    """Half the nodes lack the service's image; a few super-peers have every image."""
    net = Net(300, seed=11)
    nodes = list(net.nodes.values())
    rng = random.Random(4)
    runs = {n.addr for n in rng.sample(nodes, 150)}
    supers = {n.addr for n in rng.sample(nodes, 30)}
    for n in nodes:
        if n.addr not in runs and n.addr not in supers:
            n.verify = lambda alert: None
    for n in nodes:  # every table marks the super-peers
        n.contacts = [Contact(c.node_id, c.addr, c.addr in supers) for c in n.contacts]
    origin = next(n for n in nodes if n.addr in runs)
    aid = net.publish(origin, envelope(b"C"))
    net.settle(5.0)
    needing = [n for n in nodes if n.addr in runs and n is not origin]
    assert all(aid in n.delivered for n in needing)
    blind = [n for n in nodes if n.addr not in runs and n.addr not in supers]
    assert not any(aid in n.delivered for n in blind)
    assert not any(n.core.stats["tx_announce"] for n in blind)


def test_anti_entropy_repairs_a_node_the_tree_missed() -> None:
    cfg = BroadcastConfig(ae_interval=1.0)
    net = Net(50, seed=13, config=cfg)
    nodes = list(net.nodes.values())
    origin, lost = nodes[0], nodes[1]
    # Nobody knows the lost node: the tree cannot reach it, only anti-entropy can.
    for n in nodes:
        n.contacts = [c for c in n.contacts if c.addr != lost.addr]
    lost.contacts = [Contact(o.core.node_id, o.addr) for o in nodes[2:6]]
    aid = net.publish(origin, envelope(b"D"))
    net.settle(0.5)
    assert aid not in lost.delivered
    net.settle(10.0)
    assert aid in lost.delivered
    assert lost.core.stats["ae_repairs"] + sum(n.core.stats["ae_rounds"] for n in nodes) > 0


def test_wider_range_later_extends_forwarding() -> None:
    net = Net(40, seed=17)
    nodes = list(net.nodes.values())
    a = nodes[0]
    env = envelope(b"E")
    aid = aid_of(env)
    # First announced to `a` with a narrow range, then with the widest.
    acts = a.core.on_datagram(("10.9.9.9", 1), wire.encode(Announce(aid, 158)), 0.0, WALL)
    assert isinstance(acts[0], Fetch)
    acts = a.core.on_fetched(aid, ("10.9.9.9", 1), env, 0.0, WALL)
    assert isinstance(acts[0], Verify)
    acts = a.core.on_verdict(aid, True, 0.0)
    narrow = [x for x in acts if isinstance(x, Send)]
    acts = a.core.on_datagram(("10.9.9.8", 1), wire.encode(Announce(aid, 0)), 0.0, WALL)
    wide = [x for x in acts if isinstance(x, Send)]
    assert wire.decode(wide[0].data) == Ack(aid, AckStatus.TAKEN)
    assert len(wide) - 1 > len(narrow)
    # ...and a third time, nothing new.
    acts = a.core.on_datagram(("10.9.9.7", 1), wire.encode(Announce(aid, 0)), 0.0, WALL)
    assert len(acts) == 1


def test_forged_body_strikes_the_announcer_not_the_id() -> None:
    core = BroadcastCore(b"\x01" * 20, lambda: [], BroadcastConfig())
    env = envelope(b"F")
    aid = aid_of(env)
    bad_peer, good_peer = ("10.0.0.66", 1), ("10.0.0.7", 1)
    assert core.on_datagram(bad_peer, wire.encode(Announce(aid, 0)), 0.0, WALL) == [
        Fetch(bad_peer, aid)]
    core.on_datagram(good_peer, wire.encode(Announce(aid, 0)), 0.0, WALL)
    forged = bytearray(env)
    forged[-5] ^= 1
    acts = core.on_fetched(aid, bad_peer, bytes(forged), 0.0, WALL)
    assert acts == [Fetch(good_peer, aid)]  # the id is still wanted, from someone else
    assert core.stats["forged"] == 1 and core.stats["strikes"] == 1
    acts = core.on_fetched(aid, good_peer, env, 0.0, WALL)
    assert isinstance(acts[0], Verify)
    acts = core.on_verdict(aid, True, 0.0)
    assert any(isinstance(a, Deliver) for a in acts)


@pytest.mark.parametrize("size, push", [(40, True), (40, False), (1500, True)])
def test_a_small_body_rides_in_the_announcement_and_is_acknowledged_not_fetched(
        size: int, push: bool) -> None:
    """A body that fits a datagram goes along with the announcement: the receiver
    acknowledges at once and verifies, no fetch; a larger one, or with pushing off, is
    fetched as before. Either way the sender counts the subtree as taken."""
    cfg = BroadcastConfig(push_bytes=wire.MAX_DATAGRAM if push else 0)
    sender_addr, receiver_addr = ("10.0.0.1", 1), ("10.0.0.2", 1)
    receiver_id = b"\x80" + bytes(19)
    sender = BroadcastCore(b"\x01" * 20, lambda: [Contact(receiver_id, receiver_addr)], cfg)
    receiver = BroadcastCore(receiver_id, lambda: [], cfg)
    env = seal(encode_alert(Alert(b"\x01" * 32, "svc", (Message(b"P" * size),),
                                  ExecutionControl((ByteRef(0, 0), ByteRef(0, 1),
                                                    ByteRef(0, 2))))),
               NodeKey.generate(), WALL).encode()
    aid, _ = sender.publish(env, 0.0, WALL)
    sends = sender.on_verdict(aid, True, 0.0)
    assert [(type(a), a.addr) for a in sends] == [(Send, receiver_addr)]
    ann = wire.decode(sends[0].data)
    pushed = push and size < 1000
    assert isinstance(ann, Announce) and ann.body == (env if pushed else b"")
    acts = receiver.on_datagram(sender_addr, sends[0].data, 0.01, WALL)
    if pushed:  # the sandbox's job first, then the acknowledgement
        assert isinstance(acts[0], Verify) and acts[0].body == env and len(acts) == 2
        assert acts[1] == Send(sender_addr, wire.encode(Ack(aid, AckStatus.TAKEN, ann.token)))
        sender.on_datagram(receiver_addr, acts[1].data, 0.02, WALL)
    else:
        assert acts == [Fetch(sender_addr, aid)]
        reply = sender.serve_fetch(receiver_addr[0], wire.encode_fetch_request(aid, 1), 0.02)
        assert reply == wire.encode_fetch_reply(env)
        assert isinstance(receiver.on_fetched(aid, sender_addr, env, 0.02, WALL)[0], Verify)
    assert sender.unsettled(aid, 0.03) == 0
    assert any(isinstance(a, Deliver) for a in receiver.on_verdict(aid, True, 0.03))
    assert receiver.stats["fetches"] == (0 if pushed else 1)


def test_a_forged_pushed_body_passes_its_announcer_over_and_an_honest_one_is_fetched() -> None:
    # Passed over, not struck: a datagram's source address can be forged, so what one brings
    # must not count against the address it names.
    core = BroadcastCore(b"\x01" * 20, lambda: [], BroadcastConfig())
    env = envelope(b"Q")
    aid = aid_of(env)
    liar, honest = ("10.0.0.66", 1), ("10.0.0.7", 1)
    forged = bytearray(env)
    forged[env.find(decode_envelope(env).signature) + 5] ^= 1
    acts = core.on_datagram(liar, wire.encode(Announce(aid, 0, body=bytes(forged))), 0.0, WALL)
    assert acts == [Send(liar, wire.encode(Ack(aid, AckStatus.TAKEN)))]  # nothing to verify
    assert core.stats["forged"] == 1 and core.stats["strikes"] == 0
    assert core.status(aid, 0.0) is None  # the id is not condemned for the liar's body
    assert core.on_datagram(honest, wire.encode(Announce(aid, 0)), 0.1, WALL) == [
        Fetch(honest, aid)]


def test_a_verifier_that_checks_signatures_gets_the_body_and_blames_the_announcer() -> None:
    # signature_by_verifier: the core leaves the signature to the verifier (in a worker
    # process), which has the envelope as received; a bad signature it reports is the
    # announcer's fault as before, and nothing is delivered or forwarded.
    me = b"\x01" * 20
    contacts = [Contact(bytes([0x80 | i]) + bytes(19), (f"10.0.1.{i}", 1)) for i in range(3)]
    core = BroadcastCore(me, lambda: contacts, BroadcastConfig(signature_by_verifier=True))
    env = envelope(b"S")
    aid = aid_of(env)
    bad_peer, good_peer = ("10.0.0.66", 1), ("10.0.0.7", 1)
    core.on_datagram(bad_peer, wire.encode(Announce(aid, 0)), 0.0, WALL)
    core.on_datagram(good_peer, wire.encode(Announce(aid, 0)), 0.0, WALL)
    forged = bytearray(env)
    forged[env.find(decode_envelope(env).signature) + 5] ^= 1  # the core does not look there
    assert check_body(aid, bytes(forged), WALL, BroadcastConfig()).outcome is Outcome.FORGED
    acts = core.on_fetched(aid, bad_peer, bytes(forged), 0.0, WALL)
    assert [type(a) for a in acts] == [Verify] and acts[0].body == bytes(forged)
    acts = core.on_verdict(aid, False, 0.0, forged=True)
    assert acts == [Fetch(good_peer, aid)]  # the id is still wanted, from someone else
    assert core.stats["forged"] == 1 and core.stats["strikes"] == 1
    assert core.status(aid, 0.0) == "pending"
    acts = core.on_fetched(aid, good_peer, env, 0.0, WALL)
    assert [type(a) for a in acts] == [Verify] and acts[0].body == env
    acts = core.on_verdict(aid, True, 0.0)
    assert any(isinstance(a, Deliver) for a in acts)
    assert any(isinstance(a, Send) and a.addr in [c.addr for c in contacts] for a in acts)


def test_a_verifier_that_parses_alerts_refutes_a_signed_body_that_is_none() -> None:
    # alert_by_verifier: the core checks the envelope, its hash to the id and its age, but
    # parses no alert; a signed body that is no alert reaches the verifier, whose refutation
    # is remembered like any other (the announcer struck, never delivered or forwarded).
    me = b"\x01" * 20
    contacts = [Contact(bytes([0x80 | i]) + bytes(19), (f"10.0.1.{i}", 1)) for i in range(3)]
    cfg = BroadcastConfig(signature_by_verifier=True, alert_by_verifier=True)
    core = BroadcastCore(me, lambda: contacts, cfg)
    key, at = NodeKey.generate(), int(WALL * 1000)
    junk = Envelope(b"\xa1avx", key.public_bytes, at,  # signed, hashes to its id, no alert
                    key.sign(signed_message(b"\xa1avx", at)))
    assert check_body(aid_of(junk.encode()), junk.encode(), WALL,
                      BroadcastConfig()).outcome is Outcome.REFUTED
    for env, verdict in ((junk.encode(), False), (envelope(b"P"), True)):
        aid, peer = aid_of(env), ("10.0.0.7", 1)
        assert check_body(aid, env, WALL + cfg.max_age_s + 1, cfg).outcome is Outcome.STALE
        assert check_body(b"\x00" * 32, env, WALL, cfg).outcome is Outcome.FORGED
        core.on_datagram(peer, wire.encode(Announce(aid, 0)), 0.0, WALL)
        acts = core.on_fetched(aid, peer, env, 0.0, WALL)
        assert [type(a) for a in acts] == [Verify] and acts[0].alert is None
        acts = core.on_verdict(aid, verdict, 0.0)
        delivered = [a for a in acts if isinstance(a, Deliver)]
        if verdict:
            assert len(delivered) == 1 and delivered[0].alert is None
            assert any(isinstance(a, Send) and a.addr in [c.addr for c in contacts]
                       for a in acts)
        else:
            assert core.status(aid, 0.0) is Outcome.REFUTED
            assert not delivered and core.stats["strikes"] == 1
            assert [wire.decode(a.data) for a in acts if isinstance(a, Send)] == [
                Ack(aid, AckStatus.REFUTED)]


def test_liar_is_banned_after_three_strikes_and_rate_limited() -> None:
    cfg = BroadcastConfig()
    core = BroadcastCore(b"\x02" * 20, lambda: [], cfg)
    liar = ("10.0.0.66", 5)
    now = 0.0
    for i in range(cfg.strikes_to_ban):
        env = envelope(bytes([0x41 + i]))
        aid = aid_of(env)
        assert core.on_datagram(liar, wire.encode(Announce(aid, 0)), now, WALL) == [
            Fetch(liar, aid)]
        core.on_fetched(aid, liar, env, now, WALL)
        acts = core.on_verdict(aid, False, now)
        assert [wire.decode(a.data) for a in acts] == [Ack(aid, AckStatus.REFUTED)]
        assert core.status(aid, now) is Outcome.REFUTED
    assert core.banned(liar[0], now)
    assert core.on_datagram(liar, wire.encode(Announce(b"\x07" * 32, 0)), now, WALL) == []
    assert not core.admit_fetch(liar[0], now)
    assert core.stats["drop_banned"] == 1
    # The ban ends.
    assert not core.banned(liar[0], now + cfg.ban_s + 1)


def test_announcement_flood_is_rate_limited_before_parsing() -> None:
    cfg = BroadcastConfig()
    core = BroadcastCore(b"\x03" * 20, lambda: [], cfg)
    flooder = ("10.0.0.99", 7)
    fetches = 0
    for i in range(1000):
        acts = core.on_datagram(flooder, wire.encode(Announce(i.to_bytes(32, "big"), 0)), 0.0, WALL)
        fetches += sum(isinstance(a, Fetch) for a in acts)
    # The burst, bounded by the pending limit too; the rest dropped before parsing.
    assert fetches <= min(cfg.announce_rate.burst, cfg.max_pending)
    assert core.stats["drop_rate"] >= 1000 - cfg.announce_rate.burst
    assert core.stats["drop_rate"] >= 1000 - 20
    # Junk in our version from a stranger, which no honest node sends: a ban at once.
    other = ("10.0.0.98", 7)
    for _ in range(10):
        core.on_datagram(other, b"\x10" + bytes((wire.VERSION,)) + b"junk", 10.0, WALL)
    assert core.stats["drop_malformed"] == 1 and core.stats["drop_banned"] == 9
    assert core.banned(other[0], 10.0)
    # A version this node does not speak is dropped without a strike (a newer honest node).
    newer = ("10.0.0.97", 7)
    for _ in range(10):
        core.on_datagram(newer, bytes((0x10, wire.VERSION + 1)) + bytes(56), 20.0, WALL)
    assert not core.banned(newer[0], 20.0)


def test_junk_in_a_contacts_name_costs_only_itself() -> None:
    """A datagram's source can be forged: junk in a contact's name is no strike and no
    surcharge on its rate, so a trickle of it neither bans the contact nor crowds out its own
    announcements."""
    contact = Contact(b"\x42" * 20, ("10.0.0.50", 7400))
    core = BroadcastCore(b"\x03" * 20, lambda: [contact], BroadcastConfig())
    for k in range(40):  # two a second for 20 s
        core.on_datagram(contact.addr, b"\x10" + bytes((wire.VERSION,)) + b"junk", k / 2, WALL)
    assert not core.banned(contact.addr[0], 20.0) and core.stats["strikes"] == 0
    aid = b"\x09" * 32
    assert core.on_datagram(contact.addr, wire.encode(Announce(aid, 5)), 20.0, WALL) == [
        Fetch(contact.addr, aid)]


def test_acknowledgements_of_made_up_ids_are_dropped_without_a_strike() -> None:
    """Nodes acknowledge only what was announced to them; acknowledgements of ids this node
    never heard of are made up, but by whom a datagram's source cannot say: nobody is banned
    for them."""
    core = BroadcastCore(b"\x05" * 20, lambda: [], BroadcastConfig())
    liar = ("10.0.0.77", 1)
    for i in range(3):
        core.on_datagram(liar, wire.encode(Ack(bytes([i]) * 32, AckStatus.TAKEN)), 1.0, WALL)
    assert core.stats["ack_unknown"] == 3
    assert not core.banned(liar[0], 1.0) and core.stats["strikes"] == 0


def test_hostile_datagrams_never_raise() -> None:
    core = BroadcastCore(b"\x04" * 20, lambda: [], BroadcastConfig(
        announce_rate=BroadcastConfig().announce_rate.__class__(1e9, 1e9)))
    rng = random.Random(1)
    for i in range(5000):
        n = rng.choice([0, 1, 2, 3, 33, 34, 35, 56, 57, 96, 97, 4 + 32 * 3, 600])
        data = bytes([rng.choice([0x10, 0x11, 0x12, rng.randrange(256)]), wire.VERSION]
                     ) + rng.randbytes(n)
        core.on_datagram((f"10.1.{i % 200}.1", 1), data[: n + 2], float(i), WALL)
    assert core.stats["drop_malformed"] > 0


def test_fetch_serving_and_acks() -> None:
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(4)]
    core = BroadcastCore(b"\x00" * 20, lambda: contacts, BroadcastConfig(ack_timeout=0.5))
    env = envelope(b"G")
    aid, acts = core.publish(env, 0.0, WALL)
    assert [type(a) for a in acts] == [Verify]
    acts = core.on_verdict(aid, True, 0.0)
    sends = [a for a in acts if isinstance(a, Send)]
    assert len(sends) == 2  # one group, two contacts
    first, second = sends[0].addr, sends[1].addr
    assert core.admit_fetch(first[0], 0.1)
    reply = core.serve_fetch(first[0], wire.encode_fetch_request(aid, first[1]), 0.1)
    assert reply == wire.encode_fetch_reply(env)
    assert core.serve_fetch("10.0.0.77", b"nonsense", 0.1) is None
    # The other never answers: after the timeout the group goes to a third contact.
    acts = core.tick(0.6)
    assert any(isinstance(a, Unresponsive) and a.contact.addr == second for a in acts)
    third = [a for a in acts if isinstance(a, Send)]
    assert len(third) == 1 and third[0].addr not in (first, second)
    # The fetcher that took it then says it cannot verify: its slot goes to a fourth.
    acts = core.on_datagram(first, answer(sends[0], AckStatus.CANNOT_VERIFY), 0.7, WALL)
    fourth = [a for a in acts if isinstance(a, Send)]
    assert len(fourth) == 1 and fourth[0].addr not in (first, second, third[0].addr)


def test_unsettled_counts_announcements_not_yet_fetched_or_acknowledged() -> None:
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(4)]
    core = BroadcastCore(b"\x00" * 20, lambda: contacts, BroadcastConfig(ack_timeout=0.5))
    aid, _ = core.publish(envelope(b"H"), 0.0, WALL)
    assert core.unsettled(aid, 0.0) is None  # not verified here yet: nothing handed out
    one, two = (a for a in core.on_verdict(aid, True, 0.0) if isinstance(a, Send))
    first, second = one.addr, two.addr
    assert core.unsettled(aid, 0.0) == 2
    core.serve_fetch(first[0], wire.encode_fetch_request(aid, first[1]), 0.1)
    assert core.unsettled(aid, 0.1) == 1  # the fetch took it
    # A refusal passes the subtree on: the next candidate is waited for in its place.
    acts = core.on_datagram(second, answer(two, AckStatus.CANNOT_VERIFY), 0.2, WALL)
    nxt = [a for a in acts if isinstance(a, Send)]
    assert len(nxt) == 1 and core.unsettled(aid, 0.2) == 1
    core.on_datagram(nxt[0].addr, answer(nxt[0], AckStatus.TAKEN), 0.3, WALL)
    assert core.unsettled(aid, 0.3) == 0
    # Announced to nobody (no contacts): settled at once.
    lonely = BroadcastCore(b"\x01" * 20, lambda: [], BroadcastConfig())
    aid2, _ = lonely.publish(envelope(b"I"), 0.0, WALL)
    lonely.on_verdict(aid2, True, 0.0)
    assert lonely.unsettled(aid2, 0.0) == 0


def test_an_unreachable_contact_is_passed_over_at_once() -> None:
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(4)]
    core = BroadcastCore(b"\x00" * 20, lambda: contacts, BroadcastConfig(ack_timeout=0.5))
    aid, _ = core.publish(envelope(b"U"), 0.0, WALL)
    sends = [a for a in core.on_verdict(aid, True, 0.0) if isinstance(a, Send)]
    dead = sends[1].addr
    # Nobody listens there (ICMP): its copy goes to the next candidate now, not at 0.5 s.
    acts = core.unreachable(dead, 0.01)
    assert any(isinstance(a, Unresponsive) and a.contact.addr == dead for a in acts)
    nxt = [a.addr for a in acts if isinstance(a, Send)]
    assert len(nxt) == 1 and nxt[0] not in (sends[0].addr, dead)
    # Only what is waiting on that address moves: nothing twice, nothing for anyone else.
    assert core.unreachable(dead, 0.02) == []
    assert core.unreachable(("10.0.0.99", 9), 0.02) == []
    assert [a for a in core.tick(0.6) if isinstance(a, Unresponsive)] != []  # the others'
    assert core.stats["unreachable"] == 1


def test_publish_refuses_bad_envelopes() -> None:
    core = BroadcastCore(b"\x05" * 20, lambda: [])
    with pytest.raises(PublishError):
        core.publish(b"\x00garbage", 0.0, WALL)
    forged = bytearray(envelope(b"H"))
    forged[-5] ^= 1
    with pytest.raises(PublishError):
        core.publish(bytes(forged), 0.0, WALL)
    with pytest.raises(PublishError):
        core.publish(envelope(b"H", wall=WALL - 10 * 3600), 0.0, WALL)


def test_anti_entropy_digest_exchange() -> None:
    core = BroadcastCore(b"\x06" * 20, lambda: [Contact(b"\x07" * 20, ("10.0.0.7", 1))],
                         BroadcastConfig(ae_interval=1.0))
    env = envelope(b"I")
    aid, acts = core.publish(env, 0.0, WALL)
    core.on_verdict(aid, True, 0.0)
    acts = core.tick(2.0)
    digests = [wire.decode(a.data) for a in acts if isinstance(a, Send)]
    assert IHave((aid,), True) in digests
    # A peer that lacks nothing gets no answer; one that lacks it gets a digest back.
    assert core.on_datagram(("10.0.0.8", 1), wire.encode(IHave((aid,), True)), 2.0, WALL) == []
    acts = core.on_datagram(("10.0.0.9", 1), wire.encode(IHave((), True)), 2.0, WALL)
    assert [wire.decode(a.data) for a in acts] == [IHave((aid,), False)]
    # An unknown id in a digest is fetched from the peer, and an asking digest that claims
    # one is not answered until the peer has shown it holds what it claims.
    other = b"\x09" * 32
    acts = core.on_datagram(("10.0.0.10", 1), wire.encode(IHave((other,), True)), 2.0, WALL)
    assert acts == [Fetch(("10.0.0.10", 1), other)]


def test_an_acknowledgement_counts_only_with_the_token_of_its_announcement() -> None:
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(4)]
    core = BroadcastCore(b"\x00" * 20, lambda: contacts, BroadcastConfig(ack_timeout=0.5))
    aid, _ = core.publish(envelope(b"T"), 0.0, WALL)
    one, two = (a for a in core.on_verdict(aid, True, 0.0) if isinstance(a, Send))
    mine = wire.decode(one.data)
    assert isinstance(mine, Announce) and mine.token != wire.decode(two.data).token
    # Anyone who knows the id (here: the first receiver, with its own token) cannot say
    # "taken" or "cannot verify" in the second's name.
    for token in (wire.NO_TOKEN, mine.token):
        for status in (AckStatus.TAKEN, AckStatus.CANNOT_VERIFY):
            acts = core.on_datagram(two.addr, wire.encode(Ack(aid, status, token)), 0.1, WALL)
            assert acts == []
    assert core.stats["ack_forged"] == 4 and core.unsettled(aid, 0.1) == 2
    # So the silent second is still passed over at its timeout, and its copy reaches a third.
    acts = core.tick(0.6)
    assert {a.contact.addr for a in acts if isinstance(a, Unresponsive)} == {two.addr, one.addr}
    assert len([a for a in acts if isinstance(a, Send)]) == 2
    # The genuine answer counts.
    core.on_datagram(one.addr, answer(one, AckStatus.TAKEN), 0.7, WALL)
    assert core.stats["ack_forged"] == 4 and core.unsettled(aid, 0.7) == 2


@pytest.mark.parametrize("forged_first", [True, False])
def test_a_receiver_answers_each_announcer_with_its_first_and_latest_tokens(
        forged_first: bool) -> None:
    """A forged announcement in an announcer's name may come before its real one or after it:
    the later answers go with both tokens, and the announcer counts the one that is its own."""
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(4)]
    sender = BroadcastCore(b"\x00" * 20, lambda: contacts, BroadcastConfig(ack_timeout=0.5))
    aid, _ = sender.publish(envelope(b"F"), 0.0, WALL)
    sends = [a for a in sender.on_verdict(aid, True, 0.0) if isinstance(a, Send)]
    me = sends[1].addr  # the receiver below, as the sender knows it
    real = wire.decode(sends[1].data)
    assert isinstance(real, Announce)
    real = dataclasses.replace(real, body=b"")  # fetched, not pushed
    fake = dataclasses.replace(real, token=b"\x66" * 8)
    receiver = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig())
    sender_addr = ("10.0.0.99", 9)  # the sender, as the receiver knows it
    for ann in ((fake, real) if forged_first else (real, fake)):
        receiver.on_datagram(sender_addr, wire.encode(ann), 0.0, WALL)
    acts = receiver.on_fetched(aid, sender_addr, None, 0.1, WALL)  # nobody could serve it
    assert sorted(wire.decode(a.data).token for a in acts) == sorted([real.token, fake.token])
    moved: list[object] = []
    for a in acts:
        moved += sender.on_datagram(me, a.data, 0.2, WALL)
    assert sender.stats["ack_forged"] == 1  # the forged copy; the real one moves the subtree
    assert [a.addr for a in moved if isinstance(a, Send)] not in ([], [me])


def test_ack_timeout_adapts_to_slow_peers() -> None:
    contacts = [Contact(bytes([0x80 | i]) + b"\x00" * 19, (f"10.0.0.{i}", 9)) for i in range(6)]
    cfg = BroadcastConfig(ack_timeout=0.3, max_ack_timeout=2.0)
    core = BroadcastCore(b"\x00" * 20, lambda: contacts, cfg)
    assert core.ack_wait() == 0.3
    now = 0.0
    for k in range(12):  # peers that take 0.8 s to acknowledge, alert after alert
        aid, _ = core.publish(envelope(bytes([0x50 + k])), now, WALL + now)
        sends = [a for a in core.on_verdict(aid, True, now) if isinstance(a, Send)]
        now += 0.8
        for s in sends:
            core.on_datagram(s.addr, answer(s, AckStatus.TAKEN), now, WALL)
        core.tick(now)
    assert 0.8 < core.ack_wait() <= 2.0
    # A slow peer is no longer taken for a dead one: no timeouts after warming up.
    timeouts = core.stats["ack_timeouts"]
    aid, _ = core.publish(envelope(b"Z"), now, WALL + now)
    core.on_verdict(aid, True, now)
    assert not [a for a in core.tick(now + 0.7) if isinstance(a, Unresponsive)]
    assert core.stats["ack_timeouts"] == timeouts


def test_a_node_that_cannot_get_the_body_hands_the_subtree_back() -> None:
    core = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig())
    aid = b"\x33" * 32
    p1, p2, liar = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    assert core.on_datagram(p1, wire.encode(Announce(aid, 5)), 0.0, WALL) == [Fetch(p1, aid)]
    acts = core.on_datagram(p2, wire.encode(Announce(aid, 5)), 0.0, WALL)
    assert [wire.decode(a.data) for a in acts] == [Ack(aid, AckStatus.TAKEN)]
    core.on_datagram(liar, wire.encode(Announce(aid, 5)), 0.0, WALL)
    assert core.on_fetched(aid, p1, None, 0.1, WALL) == [Fetch(p2, aid)]  # a timeout
    assert core.on_fetched(aid, p2, None, 0.2, WALL) == [Fetch(liar, aid)]
    acts = core.on_fetched(aid, liar, None, 0.3, WALL, wire.Fault.REFUSED)
    # Everyone who counted on us hears that we failed; the liar hears nothing.
    assert sorted(a.addr for a in acts) == [p1, p2]
    assert {wire.decode(a.data) for a in acts} == {Ack(aid, AckStatus.FAILED)}
    assert core.status(aid, 0.3) is None  # not held against the id: it may come again


CONTACT = Contact(b"\x42" * 20, ("10.0.0.9", 7400))


@pytest.mark.parametrize(("fault", "where", "banned"), [
    (wire.Fault.NONE, "stranger", False),
    (wire.Fault.MALFORMED, "stranger", False),  # another service where it pointed
    (wire.Fault.NOT_HERE, "stranger", True),  # three strikes
    (wire.Fault.REFUSED, "stranger", True),  # at once
    (wire.Fault.NOT_HERE, "contact", False),  # its exact address is easily forged
    (wire.Fault.REFUSED, "contact", True),  # its own fetch server is not there
    (wire.Fault.NOT_HERE, "contact's IP", False),  # another port: forged in its name
    (wire.Fault.REFUSED, "contact's IP", False),
    (wire.Fault.MALFORMED, "contact's IP", False),  # its sshd's banner, say
])
def test_what_a_failed_fetch_counts_against_the_announcer(fault: wire.Fault, where: str,
                                                          banned: bool) -> None:
    """The announcement that sent the node there may have been forged: a failed fetch counts
    against an address only where nobody else could have caused it."""
    core = BroadcastCore(b"\x07" * 20, lambda: [CONTACT], BroadcastConfig())
    peer = {"stranger": ("10.0.0.8", 7400), "contact": CONTACT.addr,
            "contact's IP": (CONTACT.addr[0], 22)}[where]
    for i in range(3):
        if core.banned(peer[0], i):
            break
        aid = bytes([i + 1]) * 32
        assert core.on_datagram(peer, wire.encode(Announce(aid, 5)), i, WALL) == [
            Fetch(peer, aid)]
        core.on_fetched(aid, peer, None, i + 0.1, WALL, fault)
    assert core.banned(peer[0], 3.0) == banned


def test_served_bytes_that_are_no_envelope_are_no_strike_a_served_forgery_is() -> None:
    core = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig())
    peer = ("10.0.0.9", 22)
    env = envelope(b"N")
    aid = aid_of(env)
    core.on_datagram(peer, wire.encode(Announce(aid, 5)), 0.0, WALL)
    core.on_fetched(aid, peer, b"SSH-2.0-OpenSSH_9.2\r\n", 0.1, WALL)
    assert core.stats["forged"] == 1 and core.stats["strikes"] == 0
    forged = bytearray(env)
    forged[env.find(decode_envelope(env).signature) + 5] ^= 1
    other = ("10.0.0.10", 7400)
    core.on_datagram(other, wire.encode(Announce(aid, 5)), 1.0, WALL)
    core.on_fetched(aid, other, bytes(forged), 1.1, WALL)
    assert core.stats["forged"] == 2 and core.stats["strikes"] == 1


def test_a_pushed_lie_stops_that_address_pushing_and_its_next_lie_is_its_own() -> None:
    """A pushed body's source may be forged, so a refuted one is no strike; but that
    address's bodies are then fetched, not taken from datagrams, and a lie it serves over the
    stream this node opened is a strike: a liar cannot make the sandbox run for free."""
    core = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig())
    liar = ("10.0.0.66", 7400)
    envs = [envelope(bytes([0x61 + i])) for i in range(4)]
    first = aid_of(envs[0])
    acts = core.on_datagram(liar, wire.encode(Announce(first, 5, body=envs[0])), 0.0, WALL)
    assert any(isinstance(a, Verify) for a in acts)
    core.on_verdict(first, False, 0.1)  # refuted by the sandbox
    assert core.stats["strikes"] == 0 and core.stats["push_distrusted"] == 1
    for i, env in enumerate(envs[1:], 1):
        aid = aid_of(env)
        acts = core.on_datagram(liar, wire.encode(Announce(aid, 5, body=env)), i, WALL)
        assert acts == [Fetch(liar, aid)]  # not verified from the datagram: fetched
        acts = core.on_fetched(aid, liar, env, i + 0.1, WALL)
        assert any(isinstance(a, Verify) for a in acts)
        core.on_verdict(aid, False, i + 0.2)
    assert core.stats["push_ignored"] == 3 and core.banned(liar[0], 4.0)


def test_pushed_bodies_cannot_make_the_sandbox_run_without_bound() -> None:
    """A few pushes at a time per address, and all strangers' pushes together within
    ``stranger_push_rate`` (forged sources are free): the rest are fetched."""
    cfg = BroadcastConfig()
    core = BroadcastCore(b"\x07" * 20, lambda: [], cfg)
    envs = [envelope(bytes([i % 250 + 1, i // 250 + 1])) for i in range(120)]
    runs = sum(isinstance(a, Verify) for env in envs[:20] for a in core.on_datagram(
        ("10.0.0.66", 7400), wire.encode(Announce(aid_of(env), 5, body=env)), 0.0, WALL))
    assert runs == cfg.max_fetches_per_peer
    runs = sum(isinstance(a, Verify) for i, env in enumerate(envs[20:]) for a in core.on_datagram(
        (f"10.1.{i // 250}.{i % 250 + 1}", 7400), wire.encode(Announce(aid_of(env), 5, body=env)),
        0.0, WALL))
    assert runs <= cfg.stranger_push_rate.burst


def test_publishing_over_a_pushed_alert_in_the_sandbox_frees_its_pusher() -> None:
    core = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig())
    pusher = ("10.0.0.66", 7400)
    for i in range(3):  # more than max_fetches_per_peer times over
        env = envelope(bytes([0x70 + i]))
        aid = aid_of(env)
        acts = core.on_datagram(pusher, wire.encode(Announce(aid, 5, body=env)), i, WALL)
        assert any(isinstance(a, Verify) for a in acts)  # taken from the datagram
        core.publish(env, i + 0.1, WALL)  # our own detection of the same alert, meanwhile
        core.on_verdict(aid, True, i + 0.2)
    assert core.stats["push_ignored"] == 0


def test_a_ban_that_ran_out_is_seen_by_the_kernel_filter() -> None:
    core = BroadcastCore(b"\x07" * 20, lambda: [], BroadcastConfig(ban_s=10.0))
    core.ban("10.0.0.5", 0.0)
    epoch = core.ban_epoch
    assert not core.banned("10.0.0.5", 11.0)  # expired on a lookup (a fetch, a datagram)
    assert core.ban_epoch > epoch and core.banned_ips(11.0) == []


def strict_chain(n: int, seed: int) -> tuple[Net, list[SimNode]]:
    """``n`` cores in a line, each knowing only its neighbours; no anti-entropy in reach."""
    net = Net(n, seed=seed, config=BroadcastConfig(ae_interval=1000.0))
    nodes = list(net.nodes.values())
    for i, node in enumerate(nodes):
        node.contacts = [Contact(o.core.node_id, o.addr) for o in nodes[max(i - 1, 0):i + 2]
                         if o is not node]
    return net, nodes


@pytest.mark.parametrize("seed", range(40))
def test_a_strict_chain_gets_the_alert_to_its_end(seed: int) -> None:
    """Detector, three relays, vulnerable host, each knowing only its neighbours: a relay's
    own groups need not hold the next one, and the masks of groups nobody covers take the
    alert on anyway, with one announcement and one fetch per hop (40 id layouts)."""
    net, nodes = strict_chain(5, seed)
    aid = net.publish(nodes[0], envelope())
    net.settle(2.0)
    assert all(aid in n.delivered for n in nodes[1:])
    assert sum(n.sent for n in nodes) == 2 * (len(nodes) - 1)
    assert not any(n.core.stats["ae_rounds"] for n in nodes)


def test_uncovered_groups_are_read_relative_to_the_authenticated_sender() -> None:
    """The mask is read against the sender's id from our own contacts: an address we have no
    contact for gets no extra regions handed out for its mask."""
    me = b"\x00" * 20
    far = [Contact(bytes([0x80 | i]) + bytes(19), (f"10.0.1.{i}", 1)) for i in range(4)]
    sender = Contact(b"\x01" + bytes(19), ("10.0.0.1", 1))  # our group 7
    env = envelope(b"M")
    aid = aid_of(env)

    def sends_after(addr: tuple[str, int]) -> list[Send]:
        core = BroadcastCore(me, lambda: [sender, *far], BroadcastConfig())
        # Limit 160: nothing of ours in range; the mask says the sender's group 0 (our
        # group 0 too) has nobody in it as far as the sender knows.
        ann = Announce(aid, 160, 1, 0, uncovered=1)
        assert isinstance(core.on_datagram(addr, wire.encode(ann), 0.0, WALL)[0], Fetch)
        assert isinstance(core.on_fetched(aid, addr, env, 0.0, WALL)[0], Verify)
        return [a for a in core.on_verdict(aid, True, 0.0) if isinstance(a, Send)]

    assert sends_after(("10.0.0.99", 1)) == []
    handed = sends_after(sender.addr)
    assert len(handed) == 1 and handed[0].addr in {c.addr for c in far}
    assert wire.decode(handed[0].data).limit == 1  # exactly that group, seen from inside it
