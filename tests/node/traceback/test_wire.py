"""The signed query/answer messages and how a router answers: round trips, forgeries, replays,
retries, staleness, allow-lists, rate limits; hostile bytes only raise WireError."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.stack.packet import ip_bytes, udp_packet
from node.traceback.config import MAX_LINKS, ROUTER, ConfigError, Link, RouterConfig, RouterRef
from node.traceback.digest import invariant_key
from node.traceback.sim import SimNet
from node.traceback.wire import (
    MAX_ANSWER_BYTES,
    Hit,
    WireError,
    make_answer,
    make_query,
    read_answer,
    read_query,
)
from overlay.limits import Rate
from sca.keys import NodeKey

KEY = NodeKey.from_private_bytes(b"\x11" * 32)
OTHER = NodeKey.from_private_bytes(b"\x22" * 32)
INV = b"\x45\x11\x00\x24" + bytes(range(16))


def test_query_round_trip() -> None:
    q, data = make_query(KEY, INV, 100.0, 106.5, 105.0)
    got = read_query(data)
    assert got == q and got.querier == KEY.public_bytes
    assert len(data) < 250


def test_answer_round_trip_with_links() -> None:
    net = SimNet([("a", "b")], {"atk": "a"})
    cfg = net.cores["a"].config
    data = make_answer(KEY, 101, b"n" * 16, 5.0, hits=[Hit("h-atk", 4.0, 4.5)], links=cfg.links)
    ans = read_answer(data)
    assert ans.router_id == 101 and ans.status == "ok"
    assert ans.hits == (Hit("h-atk", 4.0, 4.5),)
    assert ans.links == cfg.links
    assert len(data) < 500


def test_the_largest_answer_fits_one_overlay_datagram() -> None:
    """A router with the most links, longest names and addresses, and a match in every slice
    of a ten-minute window in every table: the answer merges the slices per table and still
    fits; fewer hits go slice by slice."""
    links = tuple(Link(f"to-router-{i:05d}", ROUTER,
                       peer=RouterRef(("255.255.255.255", 65535), bytes(32), 16383))
                  for i in range(MAX_LINKS))
    hits = [Hit(lk.name, 1.7e9 + t, 1.7e9 + t + 2, u) for lk in links for u in (False, True)
            for t in range(0, 600, 2)]
    data = make_answer(KEY, 16383, bytes(16), 1.7e9, hits=hits, links=links)
    assert len(data) <= MAX_ANSWER_BYTES
    ans = read_answer(data)
    assert len(ans.links) == MAX_LINKS and len(ans.hits) == 2 * MAX_LINKS
    assert {(h.first, h.last) for h in ans.hits} == {(1.7e9, 1.7e9 + 600)}
    few = make_answer(KEY, 1, bytes(16), 1.7e9, hits=hits[:3], links=links[:2])
    assert len(read_answer(few).hits) == 3
    with pytest.raises(ConfigError):
        RouterConfig(1, links + links[:1])


def test_forgeries_are_refused() -> None:
    _, data = make_query(KEY, INV, 1.0, 2.0, 1.5)
    tag, body, sig = cbor2.loads(data)
    fields = cbor2.loads(body)
    fields["key"] = b"\0" * 20  # change what was asked, keep the signature
    forged = cbor2.dumps([tag, cbor2.dumps(fields, canonical=True), sig])
    with pytest.raises(WireError, match="signature"):
        read_query(forged)
    fields["pk"] = OTHER.public_bytes  # claim another key
    with pytest.raises(WireError, match="signature"):
        read_query(cbor2.dumps([tag, cbor2.dumps(fields, canonical=True), sig]))
    # An answer is not a query, even with a valid signature.
    with pytest.raises(WireError):
        read_query(make_answer(KEY, 1, b"n" * 16, 1.0))
    with pytest.raises(WireError):
        read_answer(data)


@given(st.binary(max_size=600))
def test_hostile_bytes(data: bytes) -> None:
    for reader in (read_query, read_answer):
        with contextlib.suppress(WireError):
            reader(data)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.binary(max_size=40)
                    | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=6)
                    | st.dictionaries(st.text(max_size=5), c, max_size=8), max_leaves=30))
def test_hostile_cbor_bodies(obj: object) -> None:
    body = cbor2.dumps(obj)
    for tag in ("hwtq", "hwta"):
        data = cbor2.dumps([tag, body, KEY.sign(body)])
        with pytest.raises(WireError):
            (read_query if tag == "hwtq" else read_answer)(data)


def packet_net() -> tuple[SimNet, bytes]:
    net = SimNet([("a", "b")], {"atk": "a", "vic": "b"})
    pkt = udp_packet(ip_bytes("10.77.50.1"), ip_bytes(net.host_addr["vic"]), 1, 2, b"worm")
    net.send(pkt, "atk", "vic", now=100.0)
    return net, invariant_key(pkt)


def test_router_answers_hits_and_links() -> None:
    net, inv = packet_net()
    core = net.cores["a"]
    q, data = make_query(KEY, inv, 99.0, 101.0, 100.5)
    ans = read_answer(core.answer(data, "10.77.2.2", 100.5))
    assert ans.router == net.keys["a"].public_bytes and ans.nonce == q.nonce
    assert [h.link for h in ans.hits] == ["h-atk"]
    # Outside the window: nothing.
    _, data = make_query(KEY, inv, 200.0, 201.0, 100.5)
    assert read_answer(core.answer(data, "10.77.2.2", 100.5)).hits == ()


def test_replays_retries_staleness() -> None:
    net, inv = packet_net()
    core = net.cores["a"]
    q, data = make_query(KEY, inv, 99.0, 101.0, 100.0)
    first = core.answer(data, "10.77.2.2", 100.0)
    assert first is not None
    assert core.answer(data, "10.77.2.2", 100.2) == first  # a retry: the same answer
    assert core.stats.retries == 1 and core.stats.queries == 1
    # The same nonce with anything else is a replay.
    _, other = make_query(KEY, inv, 0.0, 101.0, 100.0, nonce=q.nonce)
    assert core.answer(other, "10.77.2.2", 100.3) is None
    # Too far from the router's clock.
    _, stale = make_query(KEY, inv, 0.0, 1.0, 10.0)
    assert core.answer(stale, "10.77.2.2", 100.0) is None
    assert core.answer(b"garbage", "10.77.2.2", 100.0) is None
    assert core.stats.queries_refused == 3


def test_allow_list_and_rate_limit() -> None:
    net, inv = packet_net()
    cfg = net.cores["a"].config
    d = cfg.to_dict() | {"queriers": [OTHER.public_bytes.hex()]}
    from node.traceback.core import RouterCore

    core = RouterCore(RouterConfig.from_dict(d), net.keys["a"], query_rate=Rate(1.0, 3.0))
    _, data = make_query(KEY, inv, 0.0, 1.0, 10.0)
    ans = read_answer(core.answer(data, "10.77.2.2", 10.0))
    assert ans.status == "denied" and ans.hits == ()
    _, data = make_query(OTHER, inv, 0.0, 1.0, 10.0)
    assert read_answer(core.answer(data, "10.77.2.2", 10.0)).status == "ok"
    replies = [core.answer(make_query(OTHER, inv, 0, 1, 10.0)[1], "10.77.2.2", 10.0)
               for _ in range(5)]
    assert replies.count(None) >= 4  # the bucket (burst 3) is empty


def test_config_round_trip_and_errors() -> None:
    net, _ = packet_net()
    cfg = net.cores["b"].config
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        {"router_id": 1 << 14, "links": []},
        {"router_id": 1, "links": [{"name": "x y", "kind": "edge"}]},
        {"router_id": 1, "links": [{"name": "a", "kind": "router", "router_id": 2,
                                    "addr": "10.0.0.1:7450", "key": "00"}]},
        {"router_id": 1, "links": [{"name": "a", "kind": "edge"}, {"name": "a",
                                                                   "kind": "edge"}]},
        {"router_id": 1, "listen": "nowhere"},
        {"router_id": 1, "bloom": {"fp_rate": 2}},
        {"router_id": 1, "bloom": {"colour": 2}},
        {"router_id": 1, "links": [{"name": "e", "kind": "edge", "prefix": "10.77.0.0/99"}]},
        [],
    ]
    for d in bad:
        with pytest.raises(ConfigError):
            RouterConfig.from_dict(d)
