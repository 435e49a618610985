"""Path reconstruction over a fake topology of real ``RouterCore``s (no kernel): chains, trees
and meshes, spoofed sources, background traffic, routers that are down or lie."""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest

from node.stack.checksum import checksum
from node.stack.packet import ip_bytes, udp_packet
from node.traceback.bloom import BloomConfig
from node.traceback.query import AttackGraph, trace
from node.traceback.sim import SimNet
from node.traceback.wire import make_answer
from sca.keys import NodeKey

VICTIM_KEY = NodeKey.from_private_bytes(b"\x33" * 32)
CHAIN = [(f"r{i}", f"r{i + 1}") for i in range(1, 7)]  # r1 .. r7
# A tree: r0 is the victim's gateway; depth 3, branching 2 (15 routers).
TREE = [(f"t{i}", f"t{(i - 1) // 2}") for i in range(1, 15)]


def spoofed(net: SimNet, dst_host: str, payload: bytes | None = None, src: str = "10.77.66.6",
            df: bool = True) -> bytes:
    pkt = bytearray(udp_packet(ip_bytes(src), ip_bytes(net.host_addr[dst_host]), 4444, 80,
                               payload or os.urandom(24), ident=0xBEEF))
    if not df:
        struct.pack_into("!H", pkt, 6, 0)
        pkt[10:12] = b"\0\0"
        struct.pack_into("!H", pkt, 10, checksum(pkt[:20]))
    return bytes(pkt)


def run_trace(net: SimNet, delivered: bytes, dst_host: str, at: float) -> AttackGraph:
    net.now = at
    return asyncio.run(trace(delivered, at=at, key=VICTIM_KEY,
                             gateway=net.ref(net.host_router[dst_host]), ask=net.ask,
                             clock=lambda: at))


def names(net: SimNet, g: AttackGraph) -> list[list[str]]:
    return [[net.name_of(p) for p in path] for path in g.paths()]


def background(net: SimNet, hosts: list[str], n: int, t0: float, t1: float,
               rng: random.Random) -> None:
    for i in range(n):
        a, b = rng.sample(hosts, 2)
        pkt = udp_packet(ip_bytes(net.host_addr[a]), ip_bytes(net.host_addr[b]),
                         rng.randrange(1024, 65535), 53, rng.randbytes(20))
        net.send(pkt, a, b, t0 + (t1 - t0) * i / n)


def test_chain_spoofed_source_names_true_ingress_and_path() -> None:
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7", "mid": "r4"})
    got = net.send(spoofed(net, "vic", src=net.host_addr["mid"]), "atk", "vic", now=50.0)
    g = run_trace(net, got, "vic", 50.001)
    assert names(net, g) == [[f"r{i}" for i in range(1, 8)]]
    assert [(net.name_of(i.router), i.link, i.prefix) for i in g.ingresses] == \
        [("r1", "h-atk", "10.77.1.0/24")]
    hops = {net.name_of(p): h.logged for p, h in g.hops.items()}
    assert hops == {f"r{i}": i % 2 == 1 and i < 7 for i in range(1, 8)}  # odd, not the last
    assert g.dead_ends == 0 and g.queries <= 12


@pytest.mark.parametrize("df", [True, False])
def test_tree_every_leaf(df: bool) -> None:
    leaves = [f"t{i}" for i in range(7, 15)]
    hosts = {f"h{i}": leaf for i, leaf in enumerate(leaves)} | {"vic": "t0"}
    net = SimNet(TREE, hosts)
    for i, leaf in enumerate(leaves):
        t = 100.0 + i
        got = net.send(spoofed(net, "vic", df=df), f"h{i}", "vic", now=t)
        g = run_trace(net, got, "vic", t)
        assert names(net, g) == [net.route(f"h{i}", "vic")]
        assert [(net.name_of(x.router), x.link) for x in g.ingresses] == [(leaf, f"h-h{i}")]
        assert g.atomic is df


def test_mesh_with_side_branches_and_background_fp() -> None:
    """A ladder (two parallel chains with rungs) gives non-loggers several candidate
    upstreams; heavy background traffic gives false positives. The true path must always be
    in the graph; false branches die out."""
    rng = random.Random(1)
    links = [(f"a{i}", f"a{i + 1}") for i in range(5)] + \
            [(f"b{i}", f"b{i + 1}") for i in range(5)] + [(f"a{i}", f"b{i}") for i in range(6)]
    hosts = {f"h{i}": r for i, r in enumerate(["a0", "b0", "a2", "b3", "b5", "a4"])}
    hosts["vic"] = "a5"
    net = SimNet(links, hosts, bloom=BloomConfig(min_bits=1 << 10, max_bits=1 << 10),
                 seed=3)
    background(net, list(hosts), 6000, 0.0, 10.0, rng)
    extra = 0
    for trial in range(30):
        src = rng.choice([h for h in hosts if h != "vic"])
        t = rng.uniform(1.0, 9.0)
        got = net.send(spoofed(net, "vic"), src, "vic", now=t)
        g = run_trace(net, got, "vic", t)
        assert net.route(src, "vic") in names(net, g), trial
        assert (net.host_router[src], f"h-{src}") in \
            [(net.name_of(x.router), x.link) for x in g.ingresses]
        true_edges = set(zip(net.route(src, "vic"), net.route(src, "vic")[1:], strict=False))
        extra += len({(net.name_of(u), net.name_of(d)) for u, d in g.edges} - true_edges)
    assert extra / 30 < 1.0  # false branches are rare, not absent


@pytest.mark.parametrize("where", ["r2", "r3", "r5"])
def test_router_bypassed_on_the_path(where: str) -> None:
    """A router whose queue overflowed (fail-open bypass) lets packets pass unmarked and
    unlogged, but answers queries: its downstream logs the untrusted arrival in a table of its
    own, and the walk steps over the transparent router to the true ingress."""
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7"}, bypass=[where])
    got = net.send(spoofed(net, "vic"), "atk", "vic", now=5.0)
    g = run_trace(net, got, "vic", 5.0)
    assert names(net, g) == [[f"r{i}" for i in range(1, 8)]]
    assert [(net.name_of(x.router), x.link) for x in g.ingresses] == [("r1", "h-atk")]


def test_router_down_on_the_path_is_an_unresolved_end() -> None:
    """A router that is down neither marks nor answers: the trail ends there, reported as an
    unresolved end (its links are unknown), with the path from it to the victim."""
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7"}, down=["r3"])
    got = net.send(spoofed(net, "vic"), "atk", "vic", now=5.0)
    g = run_trace(net, got, "vic", 5.0)
    assert g.ingresses == []
    assert names(net, g) == [[f"r{i}" for i in range(3, 8)]]
    r3 = net.keys["r3"].public_bytes
    assert g.hops[r3].logged is None and [u.router_id for u in g.unanswered] == [103]


def test_router_down_on_a_non_atomic_path() -> None:
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7"}, down=["r4"])
    got = net.send(spoofed(net, "vic", df=False), "atk", "vic", now=5.0)
    g = run_trace(net, got, "vic", 5.0)
    assert not g.atomic and g.ingresses == []
    assert names(net, g) == [["r4", "r5", "r6", "r7"]]


def test_packet_outside_the_window_or_never_sent() -> None:
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7"})
    got = net.send(spoofed(net, "vic"), "atk", "vic", now=5.0)
    g = run_trace(net, got, "vic", 500.0)  # asked about the wrong time
    assert g.ingresses == [] and g.paths() == []
    never = spoofed(net, "vic")
    g = run_trace(net, never, "vic", 5.0)
    assert g.ingresses == []


def test_answers_signed_by_the_wrong_key_are_ignored() -> None:
    net = SimNet(CHAIN, {"atk": "r1", "vic": "r7"})
    got = net.send(spoofed(net, "vic"), "atk", "vic", now=5.0)
    impostor = NodeKey.from_private_bytes(b"\x44" * 32)
    real_ask = net.ask

    async def ask(ref, query):  # type: ignore[no-untyped-def]
        if ref.router_id == 104:  # someone answers for r4 with another key, claiming the end
            from node.traceback.wire import read_query

            q = read_query(query)
            return make_answer(impostor, 104, q.nonce, 5.0)
        return await real_ask(ref, query)

    net.now = 5.0
    g = asyncio.run(trace(got, at=5.0, key=VICTIM_KEY, gateway=net.ref("r7"), ask=ask,
                          clock=lambda: 5.0))
    r4 = net.keys["r4"].public_bytes
    assert r4 not in g.hops or g.hops[r4].logged is None
    assert all(x.router != impostor.public_bytes for x in g.ingresses)


def test_attacker_on_the_gateways_own_edge_and_on_the_victims_side() -> None:
    net = SimNet(CHAIN, {"atk": "r7", "vic": "r7"})
    got = net.send(spoofed(net, "vic"), "atk", "vic", now=5.0)
    g = run_trace(net, got, "vic", 5.0)
    assert names(net, g) == [["r7"]]
    assert [x.link for x in g.ingresses] == ["h-atk"]
