"""A simulated router network of ``RouterCore``s, no kernel: packets hop from core to core
(each hop logs/marks as the real router would, and decrements the TTL), and queries go
straight to ``core.answer``. For unit tests of the reconstruction and for the benchmark's
many-trial measurements; ``node.traceback.netbed`` is the same topology on real namespaces.

Names follow ``netbed``: router links ``to-<peer>``, host links ``h-<host>``, host j on
10.77.(1+j).0/24.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Sequence

from node.stack.checksum import checksum
from node.traceback.bloom import BloomConfig
from node.traceback.config import EDGE, ROUTER, Link, RouterConfig, RouterRef
from node.traceback.core import RouterCore
from overlay.limits import Rate
from sca.keys import NodeKey

PORT = 7400  # overlay port
FIRST_ID = 101


class SimNet:
    def __init__(self, links: Sequence[tuple[str, str]], hosts: dict[str, str], *,
                 bloom: BloomConfig | None = None, down: Sequence[str] = (),
                 bypass: Sequence[str] = (), seed: int = 0) -> None:
        names = list(dict.fromkeys([r for pair in links for r in pair] + list(hosts.values())))
        self.keys = {n: NodeKey.from_private_bytes(bytes([i + 1]) * 32)
                     for i, n in enumerate(names)}
        self.ids = {n: FIRST_ID + i for i, n in enumerate(names)}
        self.addrs = {n: f"10.77.200.{i + 1}" for i, n in enumerate(names)}
        self.host_addr = {h: f"10.77.{1 + j}.2" for j, h in enumerate(hosts)}
        self.host_router = dict(hosts)
        self.down = set(down)  # routers that neither log nor mark nor answer (fail-open)
        self.bypass = set(bypass)  # routers that answer but let packets pass (queue bypass)
        self.nb: dict[str, list[str]] = {n: [] for n in names}
        for a, b in links:
            self.nb[a].append(b)
            self.nb[b].append(a)
        self.cores: dict[str, RouterCore] = {}
        for n in names:
            lks = [Link(f"to-{p}", ROUTER, peer=self.ref(p)) for p in self.nb[n]]
            lks += [Link(f"h-{h}", EDGE, prefix=f"10.77.{1 + j}.0/24")
                    for j, (h, r) in enumerate(hosts.items()) if r == n]
            cfg = RouterConfig(self.ids[n], tuple(lks),
                               bloom or BloomConfig())
            # Fixed digest keys: a run is reproducible (real routers draw theirs at random).
            dkey = hashlib.sha256(f"{seed}/{n}".encode()).digest()[:16]
            # No query rate limit: simulated time jumps about, and the limit is not under test.
            self.cores[n] = RouterCore(cfg, self.keys[n], digest_key=dkey,
                                       query_rate=Rate(1e9, 1e9))
        self.asked = 0

    def ref(self, name: str) -> RouterRef:
        return RouterRef((self.addrs[name], PORT), self.keys[name].public_bytes, self.ids[name])

    def name_of(self, pub: bytes) -> str:
        for n, k in self.keys.items():
            if k.public_bytes == pub:
                return n
        raise KeyError(pub.hex())

    def route(self, src_host: str, dst_host: str) -> list[str]:
        a, b = self.host_router[src_host], self.host_router[dst_host]
        prev: dict[str, str | None] = {a: None}
        queue = deque([a])
        while queue:
            here = queue.popleft()
            for there in self.nb[here]:
                if there not in prev:
                    prev[there] = here
                    queue.append(there)
        path: list[str] = []
        node: str | None = b
        while node is not None:
            path.append(node)
            node = prev[node]
        return path[::-1]

    def send(self, packet: bytes, src_host: str, dst_host: str, now: float,
             path: Sequence[str] | None = None) -> bytes:
        """Forward ``packet`` from one host to another; return it as delivered."""
        path = list(path) if path is not None else self.route(src_host, dst_host)
        pkt = packet
        for i, r in enumerate(path):
            in_link = f"h-{src_host}" if i == 0 else f"to-{path[i - 1]}"
            out_link = f"h-{dst_host}" if i == len(path) - 1 else f"to-{path[i + 1]}"
            if r not in self.down and r not in self.bypass:
                pkt = self.cores[r].forward(pkt, in_link, out_link, now) or pkt
            pkt = decrement_ttl(pkt)
        return pkt

    async def ask(self, ref: RouterRef, query: bytes) -> bytes | None:
        self.asked += 1
        name = self.name_of(ref.public_key)
        if name in self.down:
            return None
        return self.cores[name].answer(query, "10.77.0.1", self.now)

    now: float = 0.0  # the time routers see when answering


def decrement_ttl(packet: bytes) -> bytes:
    out = bytearray(packet)
    out[8] = max(0, out[8] - 1)
    hl = (out[0] & 15) * 4
    out[10:12] = b"\0\0"
    struct.pack_into("!H", out, 10, checksum(out[:hl]))
    return bytes(out)
