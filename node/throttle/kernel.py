"""The connection throttle in the kernel path: the core behind ``inet herdwall`` and NFQUEUE.

What goes into ``inet herdwall`` (``node.kernel.nft``), one atomic batch at ``install()``::

    set throttle_pass4  { type ipv4_addr . ipv4_addr; flags timeout; timeout 1d }  # working sets
    set throttle_allow4 { type ipv4_addr; flags interval }   # never delayed (operator)
    set throttle_block4 { type ipv4_addr }                   # flagged sources
    (and the same three for IPv6)
    chain throttle {                          # a regular chain, so `return` goes back to output
        oifname "lo" return                   # loopback never leaves the host
        ct state != new return                # only new flows are throttled ...
        meta l4proto != { tcp, udp } return
        tcp flags & (fin|syn|rst|ack) != syn return        # ... and of TCP, only SYNs
        ip daddr @throttle_allow4 mark PASS return
        ip saddr @throttle_block4 meta l4proto tcp reject with tcp reset
        ip saddr @throttle_block4 drop
        ip saddr . ip daddr @throttle_pass4 update @throttle_pass4 {...} mark PASS return
        mark QUEUE_THROTTLE                    # to NFQUEUE Q_THROTTLE, read here
    }
    output: jump throttle                      # after the PASS rule: the node's own sockets skip

So a flow to a working-set destination never leaves the kernel: normal traffic pays nothing.
Other new flows come here through NFQUEUE; the core decides; a queued SYN (or first UDP datagram)
is held by the kernel (``retain``) until the core releases it, and the ``call_at`` timer of
``CoreDriver`` drives the releases. Working-set changes become element changes of
``throttle_pass*``: a destination that leaves the working set is deleted from it at once. A
flagged source goes into ``throttle_block*``: its new TCP flows get a reset (the application
fails at once instead of retrying for minutes), other new flows are dropped; the SYNs held when
it was flagged are dropped (their retransmissions then meet the reset).

Least recently used, in the kernel: the pass rule ``update``s its element, which refreshes the
element's expiry, so the expiries order the pairs by last use (to the second, which is what
libnftables reports). Before the core decides, the adapter reads them (at most every
``recency_every`` seconds, and only while flows reach user space at all) and tells the core
(``ThrottleCore.touch``). An element unused for a day expires in the kernel; the next flow to it
comes here, the core passes it (still in its working set) and the element is added again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from node.kernel import nft as K
from node.kernel.marks import PASS, Q_THROTTLE, QUEUE_THROTTLE
from node.kernel.nfqueue import Handle, QueueAdapter
from node.stack.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PacketError,
    cut_addresses,
    ip_str,
    parse_ip,
)
from node.throttle.core import ThrottleCore
from node.throttle.driver import CoreDriver
from node.throttle.events import (
    Blocked,
    Cleared,
    Event,
    Flagged,
    Passed,
    PassReason,
    Released,
    WorkingSetAdded,
    WorkingSetRemoved,
)

log = logging.getLogger(__name__)

CHAIN = "throttle"
PASS_SETS = {4: "throttle_pass4", 6: "throttle_pass6"}
ALLOW_SETS = {4: "throttle_allow4", 6: "throttle_allow6"}
BLOCK_SETS = {4: "throttle_block4", 6: "throttle_block6"}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
IP_PROTO = {4: "ip", 6: "ip6"}
PASS_TIMEOUT_S = 86_400

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allowlist:
    """Destinations (addresses or networks) never delayed; the core asks ``dst in allowlist``
    with raw 4- or 16-byte addresses."""

    def __init__(self, nets: Iterable[str] = ()) -> None:
        self.nets: list[Network] = []
        for n in nets:
            self.add(n)

    def add(self, net: str) -> Network:
        parsed = ipaddress.ip_network(net, strict=False)
        if parsed not in self.nets:
            self.nets.append(parsed)
        return parsed

    def remove(self, net: str) -> Network:
        parsed = ipaddress.ip_network(net, strict=False)
        self.nets.remove(parsed)
        return parsed

    def __contains__(self, dst: object) -> bool:
        if not self.nets or not isinstance(dst, bytes | bytearray):
            return False
        addr = ipaddress.ip_address(bytes(dst))
        return any(addr in n for n in self.nets)


def _family(addr: bytes) -> int:
    return 4 if len(addr) == 4 else 6


def _elem_net(net: Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _saddr(v: int) -> K.Json:
    return {"payload": {"protocol": IP_PROTO[v], "field": "saddr"}}


def _daddr(v: int) -> K.Json:
    return {"payload": {"protocol": IP_PROTO[v], "field": "daddr"}}


def _pair(v: int) -> K.Json:
    return {"concat": [_saddr(v), _daddr(v)]}


RETURN: K.Json = {"return": None}


def ruleset(pass_timeout: int = PASS_TIMEOUT_S) -> list[K.Json]:
    """The throttle's sets, chain and jump, as one batch for ``NftTable.apply``."""
    base = {"family": K.FAMILY, "table": K.TABLE}

    def rule(chain: str, expr: list[K.Json], comment: str | None = None) -> K.Json:
        body: K.Json = {**base, "chain": chain, "expr": expr}
        if comment:
            body["comment"] = comment
        return {"add": {"rule": body}}

    cmds: list[K.Json] = []
    for v in (4, 6):
        t = ADDR_TYPE[v]
        cmds += [
            {"add": {"set": {**base, "name": PASS_SETS[v], "type": [t, t], "flags": ["timeout"],
                             "timeout": pass_timeout}}},
            {"add": {"set": {**base, "name": ALLOW_SETS[v], "type": t,
                             "flags": ["interval"]}}},
            {"add": {"set": {**base, "name": BLOCK_SETS[v], "type": t}}},
        ]
    cmds.append({"add": {"chain": {**base, "name": CHAIN}}})
    match = K.in_set
    cmds += [
        rule(CHAIN, [{"match": {"op": "==", "left": K.meta("oifname"), "right": "lo"}}, RETURN]),
        rule(CHAIN, [{"match": {"op": "!=", "left": K.ct("state"), "right": "new"}}, RETURN]),
        rule(CHAIN, [{"match": {"op": "!=", "left": K.meta("l4proto"),
                                "right": {"set": ["tcp", "udp"]}}}, RETURN]),
        rule(CHAIN, [{"match": {"op": "!=", "left": {"&": [
            {"payload": {"protocol": "tcp", "field": "flags"}}, ["fin", "syn", "rst", "ack"]]},
            "right": "syn"}}, RETURN], "of TCP only SYNs: retransmissions of held SYNs too"),
    ]
    for v in (4, 6):
        cmds.append(rule(CHAIN, [match(_daddr(v), ALLOW_SETS[v]), K.set_mark(PASS), RETURN],
                         "allowlist: never delayed"))
    for v in (4, 6):
        cmds += [
            rule(CHAIN, [match(_saddr(v), BLOCK_SETS[v]),
                         {"match": {"op": "==", "left": K.meta("l4proto"), "right": "tcp"}},
                         {"reject": {"type": "tcp reset"}}], "flagged source"),
            rule(CHAIN, [match(_saddr(v), BLOCK_SETS[v]), K.DROP], "flagged source"),
        ]
    for v in (4, 6):
        cmds.append(rule(CHAIN, [
            match(_pair(v), PASS_SETS[v]),
            {"set": {"op": "update", "set": f"@{PASS_SETS[v]}",
                     "elem": {"elem": {"val": _pair(v), "timeout": pass_timeout}}}},
            K.set_mark(PASS), RETURN], "working set: refresh last use, pass"))
    cmds.append(rule(CHAIN, [K.set_mark(QUEUE_THROTTLE)], "new destination: to the throttle"))
    cmds.append(rule("output", [{"jump": {"target": CHAIN}}], "virus throttle"))
    return cmds


class KernelThrottle:
    """The core on NFQUEUE ``Q_THROTTLE`` with the nft sets kept in step with its events.

    Use inside a running loop: ``install()`` once (puts the sets, chain and jump in the table,
    which ``NftTable.ensure()`` must have made), then ``start()``; ``close()`` stops reading (held
    packets get the queue's default verdict) and ``uninstall()`` removes the throttle's part.
    """

    def __init__(self, core: ThrottleCore, table: K.NftTable, *,
                 queue_num: int = Q_THROTTLE, netns: str | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 recency_every: float = 0.5, max_len: int = 4096,
                 fail_open: bool = True) -> None:
        self.core = core
        self.table = table
        if not isinstance(core.allowlist, Allowlist):
            core.allowlist = Allowlist()
        self.allowlist: Allowlist = core.allowlist
        self.on_event = on_event
        self.recency_every = recency_every
        self.queue = QueueAdapter(queue_num, self._on_packet, netns=netns, max_len=max_len,
                                  fail_open=fail_open)
        self.driver: CoreDriver | None = None
        self.nft_errors = 0
        self.unparsed = 0
        self._recency_at = -1e18

    # -- life cycle ---------------------------------------------------------------------------

    def install(self) -> None:
        cmds = ruleset()
        nets = list(self.allowlist.nets)
        for v in (4, 6):
            elems = [_elem_net(n) for n in nets if n.version == v]
            if elems:
                cmds.append(self.table.element_cmd("add", ALLOW_SETS[v], elems))
        self.table.apply(cmds)

    def uninstall(self) -> None:
        """Remove the jump, the chain and the sets (the rest of the table stays)."""
        out = self.table.list({"chain": {"family": K.FAMILY, "table": K.TABLE,
                                         "name": "output"}})
        handles = [r["rule"]["handle"] for r in out if "rule" in r
                   and any("jump" in e and e["jump"].get("target") == CHAIN
                           for e in r["rule"]["expr"])]
        base = {"family": K.FAMILY, "table": K.TABLE}
        cmds: list[K.Json] = [{"delete": {"rule": {**base, "chain": "output", "handle": h}}}
                              for h in handles]
        cmds.append({"delete": {"chain": {**base, "name": CHAIN}}})
        cmds += [{"delete": {"set": {**base, "name": s}}}
                 for sets in (PASS_SETS, ALLOW_SETS, BLOCK_SETS) for s in sets.values()]
        self.table.apply(cmds)

    def start(self) -> KernelThrottle:
        loop = asyncio.get_running_loop()
        self.driver = CoreDriver(self.core, loop, self._apply, self.on_event,
                                 before=self._before)
        self.queue.start()
        return self

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.queue.close()

    # -- operator -----------------------------------------------------------------------------

    def clear(self, src: str) -> list[Event]:
        """Clear a flagged source (text address)."""
        assert self.driver is not None
        return self.driver.clear(ipaddress.ip_address(src).packed)

    def allow(self, net: str) -> None:
        parsed = self.allowlist.add(net)
        self.table.apply([self.table.element_cmd("add", ALLOW_SETS[parsed.version],
                                                 [_elem_net(parsed)])])

    def disallow(self, net: str) -> None:
        parsed = self.allowlist.remove(net)
        self.table.apply([self.table.element_cmd("delete", ALLOW_SETS[parsed.version],
                                                 [_elem_net(parsed)])])

    def pass_pairs(self) -> list[tuple[str, str]]:
        """The (source, destination) pairs now in the kernel's pass sets."""
        return [pair for v in (4, 6) for pair, _ in self._pass_elements(v)]

    def blocked_sources(self) -> list[str]:
        return [str(e) for v in (4, 6) for e in self.table.list_set(BLOCK_SETS[v])]

    # -- packets ------------------------------------------------------------------------------

    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        assert self.driver is not None
        try:
            ip = parse_ip(payload, verify=False)
        except PacketError:
            # Longer than the queue copies (nfqueue.COPY_RANGE): a SYN or datagram all the
            # same (the rules queue nothing else), throttled by its header's addresses.
            cut = cut_addresses(payload)
            if cut is not None:
                self.driver.attempt(*cut, handle)
                return
            self.unparsed += 1
            handle.accept()  # not ours to judge: the rules only queue TCP SYNs and UDP
            return
        if ip.proto not in (IPPROTO_TCP, IPPROTO_UDP):
            handle.accept()
            return
        self.driver.attempt(bytes(ip.src), bytes(ip.dst), handle)

    def _before(self, now: float) -> None:
        if now - self._recency_at >= self.recency_every:
            self._recency_at = now
            self._refresh_recency()

    # -- events -> kernel ---------------------------------------------------------------------

    def _apply(self, events: list[Event]) -> None:
        cmds: list[K.Json] = []
        for e in events:
            if isinstance(e, WorkingSetAdded):
                cmds.append(self._pair_cmd("add", e.src, e.dst))
            elif isinstance(e, WorkingSetRemoved):
                # add-then-delete: the element may have expired in the kernel already, and a
                # delete of a missing element would fail the whole batch.
                cmds.append(self._pair_cmd("add", e.src, e.dst))
                cmds.append(self._pair_cmd("delete", e.src, e.dst))
            elif isinstance(e, Passed) and e.reason is PassReason.WORKING_SET:
                cmds.append(self._pair_cmd("add", e.src, e.dst))  # it had expired in the kernel
            elif isinstance(e, Flagged):
                log.warning("worm-like scanning from %s: %d new destinations waiting; its new "
                            "flows are blocked", ip_str(e.src), e.depth)
                cmds.append(self._addr_cmd("add", BLOCK_SETS, e.src))
            elif isinstance(e, Cleared):
                cmds.append(self._addr_cmd("add", BLOCK_SETS, e.src))
                cmds.append(self._addr_cmd("delete", BLOCK_SETS, e.src))
        if cmds:
            try:
                self.table.apply(cmds)
            except K.NftError as exc:
                # The verdicts below still go out; a missing pass element only means the next
                # flow to it comes here and the core passes it again.
                self.nft_errors += 1
                log.error("throttle: nft batch failed: %s", exc)
        for e in events:
            if isinstance(e, Passed | Released):
                if isinstance(e.flow, Handle):
                    e.flow.accept()
            elif isinstance(e, Blocked) and isinstance(e.flow, Handle):
                e.flow.drop()

    def _pair_cmd(self, verb: str, src: bytes, dst: bytes) -> K.Json:
        return self.table.element_cmd(verb, PASS_SETS[_family(src)], [(ip_str(src),
                                                                        ip_str(dst))])

    def _addr_cmd(self, verb: str, sets: dict[int, str], addr: bytes) -> K.Json:
        return self.table.element_cmd(verb, sets[_family(addr)], [ip_str(addr)])

    # -- recency ------------------------------------------------------------------------------

    def _pass_elements(self, v: int) -> list[tuple[tuple[str, str], float]]:
        """((source, destination), seconds until expiry) of a pass set."""
        out = self.table.list({"set": {"family": K.FAMILY, "table": K.TABLE,
                                       "name": PASS_SETS[v]}})
        found: list[tuple[tuple[str, str], float]] = []
        for item in out:
            for e in item.get("set", {}).get("elem", []):
                inner = e.get("elem", e) if isinstance(e, dict) else e
                val = inner.get("val", inner) if isinstance(inner, dict) else inner
                if isinstance(val, dict) and "concat" in val and len(val["concat"]) == 2:
                    s, d = val["concat"]
                    expires = inner.get("expires", PASS_TIMEOUT_S) if isinstance(
                        inner, dict) else PASS_TIMEOUT_S
                    found.append(((str(s), str(d)), float(expires)))
        return found

    def _refresh_recency(self) -> None:
        """Tell the core which working-set destinations the kernel passed most recently."""
        try:
            elems = self._pass_elements(4) + self._pass_elements(6)
        except K.NftError as exc:
            self.nft_errors += 1
            log.error("throttle: cannot read the pass sets: %s", exc)
            return
        per_src: dict[Hashable, list[tuple[float, bytes]]] = {}
        for (s, d), expires in elems:
            src = ipaddress.ip_address(s).packed
            per_src.setdefault(src, []).append((expires, ipaddress.ip_address(d).packed))
        for src, items in per_src.items():
            # Least recently used first: the soonest expiry. Ties (same second) keep the core's
            # own order, since sorting is stable and touch only moves what it is given.
            order = {d: i for i, d in enumerate(self.core.working_set(src))}
            items.sort(key=lambda it: (it[0], order.get(it[1], -1)))
            self.core.touch(src, [d for _, d in items])
