"""The router role, sans-I/O: what happens to each forwarded packet, and how a query is
answered. The NFQUEUE and overlay adapters (``node.traceback.router``,
``node.traceback.rpc``) only move bytes and read the clock.

    core = RouterCore(config, node_key)
    new = core.forward(packet, in_link="to-r1", out_link="to-r3", now=time.time())
    # new is the packet to send on (mark written or cleared), or None: send it unchanged
    reply = core.answer(datagram, source_ip, now)   # None: drop silently
    core.tick(now)                                  # about every slice_s: close and fold
"""

from __future__ import annotations

from dataclasses import dataclass

from node.traceback.bloom import DigestStore
from node.traceback.config import EDGE, ROUTER, RouterConfig
from node.traceback.digest import PAYLOAD_BYTES, Digester, key_of
from node.traceback.marking import ID_MASK, MARKED, decide, set_ident
from node.traceback.wire import Hit, WireError, make_answer, read_query
from overlay.limits import KeyedBuckets, Rate
from sca.keys import NodeKey

_UNKNOWN_IN = (None, True)  # (upstream id, faces hosts) for an interface not in the config
_UNKNOWN_OUT = (None, False)
UNTRUSTED = "/u"  # table-name suffix (interface names cannot hold "/")
MAX_WINDOW_S = 600.0  # one query looks at most this far
NONCE_MEMORY = 4096


@dataclass
class RouterStats:
    forwarded: int = 0
    logged: int = 0
    marked: int = 0  # identification written with our mark
    cleared: int = 0  # last hop: mark removed
    not_atomic: int = 0  # fragments or no DF: logged, never marked
    malformed: int = 0  # not parseable IPv4: passed on untouched
    cut: int = 0  # longer than the queue copies: logged, never rewritten (marked or cleared)
    queries: int = 0
    queries_refused: int = 0  # bad, replayed, stale, rate-limited or not allowed
    retries: int = 0  # the same query again: the same answer again


class RouterCore:
    def __init__(self, config: RouterConfig, key: NodeKey, *, digest_key: bytes | None = None,
                 query_rate: Rate | None = None) -> None:
        self.config = config
        self.key = key
        self.store = DigestStore(config.bloom)
        self.digester = Digester(digest_key)
        self.stats = RouterStats()
        # Per link: (table name, id of the traceback router behind it or None, faces hosts).
        self._links = {lk.name: (lk.peer.router_id if lk.kind == ROUTER and lk.peer else None,
                                 lk.kind == EDGE) for lk in config.links}
        self._buckets = KeyedBuckets(query_rate or Rate(200.0, 400.0))
        # nonce -> (time, the query datagram, our answer): a retried query (its answer was
        # lost) gets the same answer again; any other reuse of a nonce is a replay.
        self._nonces: dict[bytes, tuple[float, bytes, bytes | None]] = {}

    # -- the forwarding path

    def forward(self, packet: bytes, in_link: str, out_link: str, now: float) -> bytes | None:
        """Log and/or mark one forwarded IPv4 packet. Returns the rewritten packet, or None
        when it goes on unchanged (also when it is not IPv4: never drop for our sake)."""
        st = self.stats
        st.forwarded += 1
        n = len(packet)
        if n < 20 or packet[0] >> 4 != 4:
            st.malformed += 1
            return None
        hl = (packet[0] & 15) * 4
        total = (packet[2] << 8) | packet[3]
        # A packet longer than the queue copies (nfqueue.COPY_RANGE) arrives cut: its digest
        # needs only the header and the payload's first bytes, but a rewrite would cut it.
        if hl < 20 or total < hl or (total > n and n < hl + PAYLOAD_BYTES):
            st.malformed += 1
            return None
        # An interface missing from the config is treated like an edge link: untrusted, so the
        # packet is logged (in a table named after it) and the trail is kept.
        upstream_id, _ = self._links.get(in_link, _UNKNOWN_IN)
        _, last_hop = self._links.get(out_link, _UNKNOWN_OUT)
        ident = (packet[4] << 8) | packet[5]
        d = decide(frag_word=(packet[6] << 8) | packet[7], ident=ident,
                   my_id=self.config.router_id, upstream_id=upstream_id, last_hop=last_hop)
        if d.log:  # the digest only when logging: half the packets skip it
            # A router link whose mark was not that neighbour's (it was down, bypassed under
            # load, or misconfigured): a table of its own, so the walk knows that neighbour
            # may have done nothing to the packet.
            untrusted = upstream_id is not None and d.ident is not None and not (
                ident & MARKED and ident & ID_MASK == upstream_id)
            self.store.insert(in_link + UNTRUSTED if untrusted else in_link,
                              self.digester.hashes(key_of(packet, hl, total)), now)
            st.logged += 1
        if d.ident is None:
            st.not_atomic += 1
            return None
        if d.ident == ident:
            return None
        if total > n:
            st.cut += 1
            return None
        if d.ident:
            st.marked += 1
        else:
            st.cleared += 1
        out = bytearray(packet)
        set_ident(out, d.ident)
        return bytes(out)

    def tick(self, now: float) -> None:
        self.store.tick(now)
        horizon = now - self.config.max_skew_s
        if len(self._nonces) > NONCE_MEMORY // 2:
            self._nonces = {n: e for n, e in self._nonces.items() if e[0] >= horizon}

    # -- the query path

    def lookup(self, inv: bytes, t_from: float, t_to: float) -> list[Hit]:
        hashes = self.digester.hashes(inv)
        return [Hit(name.removesuffix(UNTRUSTED), first, last, name.endswith(UNTRUSTED))
                for name, first, last in self.store.lookup(hashes, t_from, t_to)]

    def answer(self, data: bytes, source: str, now: float) -> bytes | None:
        """The signed answer to one query datagram, or None to drop it (malformed, bad
        signature, replayed, stale, or over the sender's rate). A well-signed query from a
        key that may not ask gets a signed ``denied``, so the asker knows why."""
        st = self.stats
        if not self._buckets.take(source, now):
            st.queries_refused += 1
            return None
        try:
            q = read_query(data)
        except WireError:
            self._buckets.charge(source, now, 10.0)  # malformed input costs its sender
            st.queries_refused += 1
            return None
        cfg = self.config
        seen = self._nonces.get(q.nonce)
        if seen is not None:
            if seen[1] == data:
                st.retries += 1
                return seen[2]
            st.queries_refused += 1
            return None
        if abs(q.ts - now) > cfg.max_skew_s:
            st.queries_refused += 1
            return None
        if len(self._nonces) >= NONCE_MEMORY:
            # Full: forget the oldest. A query is a read, so a replay past this memory costs
            # one lookup and one answer (rate-limited per source); refusing every query while
            # the memory is full would let anyone shut the router's answers off.
            for old in list(self._nonces)[:NONCE_MEMORY // 8]:
                del self._nonces[old]
        if cfg.queriers is not None and q.querier not in cfg.queriers:
            st.queries_refused += 1
            reply = make_answer(self.key, cfg.router_id, q.nonce, now, status="denied")
        else:
            st.queries += 1
            t_to = q.t_to
            t_from = max(q.t_from, t_to - MAX_WINDOW_S)
            reply = make_answer(self.key, cfg.router_id, q.nonce, now,
                                hits=self.lookup(q.key, t_from, t_to), links=cfg.links)
        self._nonces[q.nonce] = (now, bytes(data), reply)
        return reply
