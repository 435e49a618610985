"""The traceback query RPC: ``TracebackQuery`` and ``TracebackAnswer``, signed, as bytes.

Both are deterministic CBOR, ``[tag, body, signature]`` where ``body`` is the CBOR map below
and the signature is the sender's Ed25519 signature over a domain string plus ``body`` (so a
query can never be replayed as an answer or as anything else herdwall signs)::

    query  body {"v": 1, "n": nonce(16), "ts": ms, "pk": querier key(32),
                 "key": invariant key(20), "from": ms, "to": ms}
    answer body {"v": 1, "n": same nonce, "ts": ms, "pk": router key(32), "rid": router id,
                 "st": "ok" | "denied",
                 "hits": [[link, first_ms, last_ms, untrusted], ...],  # tables holding it
                 "links": [[name, "r", rid, "a.b.c.d:port", key(32)] | [name, "e", prefix]]}

A query asks one router: *did a packet with this invariant key pass you between ``from`` and
``to``, and from which neighbour?* The answer names the matching tables (one per upstream
neighbour) with the time span of each matching slice, and the router's links, so the asker can
go on upstream knowing whom to ask next and which key must sign the answer.

Everything is checked (types, sizes, ranges) before use; anything else raises ``WireError``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import cbor2

from node.traceback.config import (
    EDGE,
    PUBLIC_KEY_LEN,
    ROUTER,
    ConfigError,
    Link,
    RouterRef,
    check_id,
    check_link_name,
    format_addr,
    parse_addr,
)
from node.traceback.digest import INVARIANT_LEN
from sca.keys import NodeKey, verify_signature

VERSION = 1
NONCE_LEN = 16
SIGNATURE_LEN = 64
MAX_QUERY_BYTES = 512
# One overlay datagram (overlay.dht.MAX_DATAGRAM, 1,400 B) holds the reply: 21 B of RPC
# header and 3 of msgpack framing around the answer. A router's answer with MAX_LINKS router
# links and two hits per link (merged per table when the slices would not fit) is 1,373 B at
# most (tests/node/traceback/test_wire.py).
MAX_ANSWER_BYTES = 1376
MAX_HITS = 64
MAX_LINKS = 8
QUERY_TAG = "hwtq"
ANSWER_TAG = "hwta"
_Q_DOMAIN = b"herdwall traceback query v1\0"
_A_DOMAIN = b"herdwall traceback answer v1\0"
_MAX_MS = 1 << 53


class WireError(ValueError):
    """A query or answer is malformed or its signature is wrong."""


@dataclass(frozen=True)
class Hit:
    link: str
    first: float  # seconds
    last: float
    untrusted: bool = False  # logged because the arrival's mark was not the neighbour's


@dataclass(frozen=True)
class TracebackQuery:
    nonce: bytes
    ts: float
    querier: bytes  # public key
    key: bytes  # invariant key
    t_from: float
    t_to: float


@dataclass(frozen=True)
class TracebackAnswer:
    nonce: bytes
    ts: float
    router: bytes  # public key
    router_id: int
    status: str  # "ok" or "denied"
    hits: tuple[Hit, ...]
    links: tuple[Link, ...]

    def link(self, name: str) -> Link | None:
        for lk in self.links:
            if lk.name == name:
                return lk
        return None


def _ms(t: float) -> int:
    return max(0, min(_MAX_MS, round(t * 1000)))


def _sign(tag: str, domain: bytes, body: dict[str, Any], key: NodeKey) -> bytes:
    raw = cbor2.dumps(body, canonical=True)
    return cbor2.dumps([tag, raw, key.sign(domain + raw)], canonical=True)


def _open(data: bytes, tag: str, domain: bytes, limit: int) -> dict[Any, Any]:
    """The checked body map of a signed message (signature verified against its ``pk``)."""
    if not isinstance(data, bytes | bytearray) or len(data) > limit:
        raise WireError(f"message missing or over {limit} bytes")
    try:
        outer = cbor2.loads(bytes(data))
        if (not isinstance(outer, list) or len(outer) != 3 or outer[0] != tag
                or not isinstance(outer[1], bytes) or not isinstance(outer[2], bytes)):
            raise WireError(f"not a {tag} message")
        body = cbor2.loads(outer[1])
    except WireError:
        raise
    except Exception as e:  # cbor2 raises several types on hostile input
        raise WireError(f"bad CBOR: {type(e).__name__}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise WireError("unknown message version")
    pk = _bytes(body, "pk", PUBLIC_KEY_LEN)
    if not verify_signature(pk, outer[2], domain + outer[1]):
        raise WireError("bad signature")
    return body


def _bytes(body: dict[Any, Any], name: str, n: int) -> bytes:
    v = body.get(name)
    if type(v) is not bytes or len(v) != n:
        raise WireError(f"{name}: expected {n} bytes")
    return v


def _int(v: object, name: str, lo: int = 0, hi: int = _MAX_MS) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"{name}: expected an integer in [{lo}, {hi}]")
    return v


# --------------------------------------------------------------------------- queries

def make_query(key: NodeKey, inv: bytes, t_from: float, t_to: float, now: float,
               nonce: bytes | None = None) -> tuple[TracebackQuery, bytes]:
    if len(inv) != INVARIANT_LEN:
        raise ValueError("invariant key must be 20 bytes")
    nonce = secrets.token_bytes(NONCE_LEN) if nonce is None else nonce
    q = TracebackQuery(nonce, now, key.public_bytes, inv, t_from, t_to)
    body = {"v": VERSION, "n": nonce, "ts": _ms(now), "pk": key.public_bytes, "key": inv,
            "from": _ms(t_from), "to": _ms(t_to)}
    return q, _sign(QUERY_TAG, _Q_DOMAIN, body, key)


def read_query(data: bytes) -> TracebackQuery:
    body = _open(data, QUERY_TAG, _Q_DOMAIN, MAX_QUERY_BYTES)
    t_from = _int(body.get("from"), "from")
    t_to = _int(body.get("to"), "to")
    if t_from > t_to:
        raise WireError("window ends before it starts")
    return TracebackQuery(_bytes(body, "n", NONCE_LEN), _int(body.get("ts"), "ts") / 1000,
                          body["pk"], _bytes(body, "key", INVARIANT_LEN), t_from / 1000,
                          t_to / 1000)


# --------------------------------------------------------------------------- answers

def _link_row(lk: Link) -> list[Any]:
    if lk.kind == ROUTER:
        assert lk.peer is not None
        return [lk.name, "r", lk.peer.router_id, format_addr(lk.peer.addr), lk.peer.public_key]
    return [lk.name, "e", lk.prefix or ""]


def _link_of(row: object) -> Link:
    if not isinstance(row, list) or len(row) not in (3, 5):
        raise WireError("link row")
    try:
        name = check_link_name(row[0])
        if row[1] == "r" and len(row) == 5:
            if type(row[4]) is not bytes or len(row[4]) != PUBLIC_KEY_LEN:
                raise WireError("link key")
            return Link(name, ROUTER, peer=RouterRef(parse_addr(row[3]), row[4],
                                                     check_id(row[2])))
        if row[1] == "e" and len(row) == 3 and isinstance(row[2], str) and len(row[2]) <= 18:
            return Link.from_dict({"name": name, "kind": EDGE, "prefix": row[2] or None})
    except ConfigError as e:
        raise WireError(f"link row: {e}") from None
    raise WireError("link row")


def merge_hits(hits: list[Hit] | tuple[Hit, ...]) -> list[Hit]:
    """One hit per table: the span from its first matching slice to its last."""
    spans: dict[tuple[str, bool], tuple[float, float]] = {}
    for h in hits:
        lo, hi = spans.get((h.link, h.untrusted), (h.first, h.last))
        spans[(h.link, h.untrusted)] = (min(lo, h.first), max(hi, h.last))
    return [Hit(link, lo, hi, u) for (link, u), (lo, hi) in spans.items()]


def make_answer(key: NodeKey, router_id: int, nonce: bytes, now: float, *, status: str = "ok",
                hits: list[Hit] | tuple[Hit, ...] = (),
                links: tuple[Link, ...] = ()) -> bytes:
    def signed(hits: list[Hit] | tuple[Hit, ...]) -> bytes:
        body = {"v": VERSION, "n": nonce, "ts": _ms(now), "pk": key.public_bytes,
                "rid": router_id, "st": status,
                "hits": [[h.link, _ms(h.first), _ms(h.last), h.untrusted]
                         for h in hits[:MAX_HITS]],
                "links": [_link_row(lk) for lk in links[:MAX_LINKS]]}
        return _sign(ANSWER_TAG, _A_DOMAIN, body, key)

    out = signed(hits)
    # Too many slices matched to list them one by one in a datagram: one span per table (the
    # walk prunes by time a little less sharply, but misses nothing).
    return out if len(out) <= MAX_ANSWER_BYTES else signed(merge_hits(hits))


def read_answer(data: bytes) -> TracebackAnswer:
    body = _open(data, ANSWER_TAG, _A_DOMAIN, MAX_ANSWER_BYTES)
    status = body.get("st")
    if status not in ("ok", "denied"):
        raise WireError("status")
    hits_raw, links_raw = body.get("hits"), body.get("links")
    if (not isinstance(hits_raw, list) or len(hits_raw) > MAX_HITS
            or not isinstance(links_raw, list) or len(links_raw) > MAX_LINKS):
        raise WireError("hits/links")
    hits = []
    for h in hits_raw:
        if not isinstance(h, list) or len(h) != 4 or type(h[3]) is not bool:
            raise WireError("hit row")
        try:
            name = check_link_name(h[0])
        except ConfigError as e:
            raise WireError(str(e)) from None
        first, last = _int(h[1], "hit first"), _int(h[2], "hit last")
        hits.append(Hit(name, first / 1000, last / 1000, h[3]))
    try:
        rid = check_id(body.get("rid"))
    except ConfigError as e:
        raise WireError(str(e)) from None
    return TracebackAnswer(_bytes(body, "n", NONCE_LEN), _int(body.get("ts"), "ts") / 1000,
                           body["pk"], rid, status, tuple(hits),
                           tuple(_link_of(r) for r in links_raw))
