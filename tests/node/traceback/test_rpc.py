"""The query as an overlay RPC, on loopback overlays in this namespace (plain sockets, no
rules): a router's overlay answers with its core; a victim's overlay it has never met gets the
answer on the retry after the router's hello; refused and stopped cost no waiting."""

from __future__ import annotations

import asyncio
import itertools
import time

from node.stack.packet import ip_bytes, udp_packet
from node.traceback.config import EDGE, Link, RouterConfig, RouterRef
from node.traceback.core import RouterCore
from node.traceback.digest import invariant_key
from node.traceback.query import trace
from node.traceback.rpc import OverlayAsker, QueryService, client_key, query_overlay
from node.traceback.wire import make_query, read_answer
from sca.keys import NodeKey

_nets = itertools.count(10)
ROUTER_KEY = NodeKey.from_private_bytes(b"\x31" * 32)
VICTIM_KEY = NodeKey.from_private_bytes(b"\x32" * 32)


def one_router() -> RouterCore:
    cfg = RouterConfig(5, (Link("h-atk", EDGE, prefix="10.77.1.0/24"),
                           Link("h-vic", EDGE, prefix="10.77.2.0/24")))
    return RouterCore(cfg, ROUTER_KEY)


def test_query_answered_over_the_overlay() -> None:
    net = f"127.88.{next(_nets) % 250}"
    core = one_router()
    # A spoofed packet from the attacker's edge to the victim's, DF set: logged here.
    pkt = udp_packet(ip_bytes("10.77.9.9"), ip_bytes("10.77.2.2"), 1, 80, b"EXPLOIT!")
    now = time.time()
    core.forward(pkt, "h-atk", "h-vic", now)

    async def main() -> None:
        router = query_overlay(ROUTER_KEY, (f"{net}.1", 0))
        victim = query_overlay(VICTIM_KEY, (f"{net}.2", 0))
        await router.start(join=False)
        await victim.start(join=False)
        try:
            service = QueryService(router, core)
            assert router.address is not None
            ref = RouterRef(router.address, ROUTER_KEY.public_bytes, 5)
            ask = OverlayAsker(victim)
            # The router has never met the victim's node: the first send goes unanswered
            # (and it says hello back), the retry is answered.
            _, q = make_query(VICTIM_KEY, invariant_key(pkt), now - 1, now + 1, time.time())
            ans = read_answer(await ask(ref, q) or b"")
            assert ans.router == ROUTER_KEY.public_bytes and [h.link for h in ans.hits] == [
                "h-atk"]
            assert ask.sent >= 2
            # The whole walk: one router, the packet came in over h-atk.
            g = await trace(pkt, at=now, key=VICTIM_KEY, gateway=ref, ask=ask)
            assert [(i.router_id, i.link) for i in g.ingresses] == [(5, "h-atk")]
            # Refused at once (a replayed nonce with other bytes; garbage): an empty reply,
            # no retries (the first wait, a whole second, never runs out).
            ask = OverlayAsker(victim, timeout=1.0)
            sent = ask.sent
            other = make_query(VICTIM_KEY, bytes(20), now - 1, now + 1, time.time(),
                               nonce=read_answer(await ask(ref, q) or b"").nonce)[1]
            assert await ask(ref, other) is None
            assert await ask(ref, b"\xa0junk") is None
            assert ask.sent - sent == 3
            assert core.stats.queries_refused >= 2
            # Stopped: refused too.
            service.close()
            _, q = make_query(VICTIM_KEY, invariant_key(pkt), now - 1, now + 1, time.time())
            assert await ask(ref, q) is None
        finally:
            await victim.stop()
            await router.stop()

    asyncio.run(main())


def test_nobody_there_costs_the_retries_and_no_more() -> None:
    net = f"127.88.{next(_nets) % 250}"

    async def main() -> None:
        victim = query_overlay(VICTIM_KEY, (f"{net}.2", 0))
        await victim.start(join=False)
        try:
            ask = OverlayAsker(victim, timeout=0.01, tries=3)
            ref = RouterRef((f"{net}.1", 9), ROUTER_KEY.public_bytes)
            assert await ask(ref, b"x" * 100) is None
            assert ask.sent == 3
        finally:
            await victim.stop()

    asyncio.run(main())


def test_client_identity_is_the_nodes_own_and_stable() -> None:
    a, b = client_key(VICTIM_KEY), client_key(VICTIM_KEY)
    assert a.public_bytes == b.public_bytes != VICTIM_KEY.public_bytes
    assert client_key(ROUTER_KEY).public_bytes != a.public_bytes


def test_a_packet_cut_by_the_queues_copy_is_logged_never_rewritten() -> None:
    """A forwarded packet longer than the kernel copies to the queue (fragments the router's
    conntrack joined) reaches the router cut: its digest is the whole packet's (the header and
    the payload's first bytes), so it is logged and can be traced; it is never rewritten (that
    would cut it on the wire)."""
    from node.kernel.nfqueue import COPY_RANGE
    from node.traceback.digest import key_of
    from node.traceback.marking import set_ident

    raw = bytearray(udp_packet(ip_bytes("10.77.9.9"), ip_bytes("10.77.2.2"), 1, 80,
                               b"EXPLOIT!" * 800))
    set_ident(raw, 0x1234)  # a mark the last hop clears: a rewrite
    pkt = bytes(raw)
    whole, cut = one_router(), one_router()
    now = time.time()
    rewritten = whole.forward(pkt, "h-atk", "h-vic", now)
    assert cut.forward(pkt[:COPY_RANGE], "h-atk", "h-vic", now) is None
    assert cut.stats.logged == whole.stats.logged == 1 and cut.stats.malformed == 0
    assert cut.stats.cut == (rewritten is not None) == 1
    assert key_of(pkt[:COPY_RANGE], 20, len(pkt)) == key_of(pkt, 20, len(pkt))
