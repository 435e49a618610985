"""The traceback query as an authenticated overlay RPC: ``serve`` on a router, ``OverlayAsker``
on the victim's side.

Routers are overlay peers and answer on their overlay port (``Overlay.serve_rpc``): only to
peers whose signed hello checked out, so a query always comes from an address that proved its
key, and the overlay's per-address rate limits and bans apply before the router sees it. The
query and answer themselves stay signed end to end (``node.traceback.wire``): the overlay
authenticates the hop, the signatures say who asked and which router answered, whoever
carried the bytes. One datagram each way: a query is under 200 bytes and an answer fits the
overlay's datagram limit (``wire.MAX_ANSWER_BYTES``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from node.traceback.config import RouterRef
from node.traceback.core import RouterCore
from node.traceback.wire import MAX_ANSWER_BYTES, MAX_QUERY_BYTES
from overlay.node import Overlay
from sca.keys import NodeKey

RPC_NAME = "traceback"


def check_args(args: list[Any]) -> tuple[bytes] | None:
    """One query, as bytes of a plausible size; anything else is a malformed frame."""
    if len(args) == 1 and type(args[0]) is bytes and len(args[0]) <= MAX_QUERY_BYTES:
        return (args[0],)
    return None


class QueryService:
    """Answers traceback queries on an overlay with ``core.answer`` while ``active``. The
    overlay cannot take an RPC back, so a stopped router role stays registered and answers
    nothing (``close()``)."""

    def __init__(self, overlay: Overlay, core: RouterCore,
                 clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.clock = clock
        self.active = True
        overlay.serve_rpc(RPC_NAME, check_args, self._answer)

    def _answer(self, sender: tuple[str, int], query: bytes) -> bytes:
        # Refused (malformed, replayed, stale, over the sender's rate, or stopped): an empty
        # reply, so the asker stops waiting at once.
        if not self.active:
            return b""
        return self.core.answer(query, sender[0], self.clock()) or b""

    def close(self) -> None:
        self.active = False


class OverlayAsker:
    """``await asker(ref, query_bytes)``: the router's answer bytes, or None after ``tries``
    sends without one (at once when refused: an empty reply), the wait doubling from
    ``timeout`` each time (by default 50 ms, 100, ... 1.6 s: 3.15 s in all). A router that
    has not met us yet answers nothing to the first send but says hello back (a round trip),
    so the first wait is short: the retry after it is answered. A retry costs the router
    little: it answers the same query (same bytes, same nonce) with its cached answer."""

    def __init__(self, overlay: Overlay, *, timeout: float = 0.05, tries: int = 6) -> None:
        self.overlay = overlay
        self.timeout = timeout
        self.tries = tries
        self.sent = 0

    async def __call__(self, ref: RouterRef, query: bytes) -> bytes | None:
        wait = self.timeout
        for _ in range(self.tries):
            self.sent += 1
            try:
                reply = await asyncio.wait_for(
                    self.overlay.call_rpc(ref.addr, RPC_NAME, query, attempts=1), wait)
            except TimeoutError:
                wait *= 2
                continue
            if reply is None:  # the overlay's own RPC timeout: no answer to that send
                continue
            # b"": refused; anything but bytes is not an answer either.
            return reply if type(reply) is bytes and 0 < len(reply) <= MAX_ANSWER_BYTES \
                else None
        return None


def _cannot_tell(alert: object) -> None:
    return None  # no sandbox behind this overlay node: it judges no alert


def query_overlay(key: NodeKey, bind: tuple[str, int]) -> Overlay:
    """An overlay node that only carries traceback queries (a router in a testbed, or the
    ``herdwall alert trace`` client): it relays no alert it cannot judge."""
    return Overlay(key, bind, verify=_cannot_tell)


def client_key(key: NodeKey) -> NodeKey:
    """The overlay identity of a node's traceback client (``herdwall alert trace``), derived
    from the node key: not the node's own identity (the running node keeps that, and its
    address with it, in every peer's tables), and the same one on every run (peers admit only
    two identities per IP address, so a fresh one each run would soon be refused). Ed25519
    signatures are deterministic, so a signature over a fixed string is a secret seed only
    the key's holder can make."""
    return NodeKey.from_private_bytes(
        hashlib.sha256(key.sign(b"herdwall traceback client identity v1")).digest())
