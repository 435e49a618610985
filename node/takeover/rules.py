"""Takeover in table ``inet herdwall``: which packets go to the takeover queue, and how the
node's own segments get out untouched.

Marks and the queue (defined in ``node.kernel.marks`` with the others)::

    QUEUE_TAKEOVER -> NFQUEUE Q_TAKEOVERS: packets of watched flows (fanned out by CPU)
    QUEUE_TAKEN -> NFQUEUE Q_TAKEOVER: packets of taken-over flows (one queue: in order)
    TAKEOVER_OWN : SO_MARK of the node's takeover sockets (raw, repaired)
    REPAIR_LOCAL : the TCP_REPAIR baseline's redirect (policy-routed to a local socket)

Chains (priorities as in ``node.kernel.nft``; lower runs first)::

    output -300 takeover_raw : mark TAKEOVER_OWN -> notrack, mark PASS
    output -152 takeover_out: mark QUEUE_STACK, ct state untracked -> mark PASS (see below)
    input/forward/output -152 takeover_in/_fwd/_out -> jump takeover_mark
    takeover_mark: mark PASS or REPAIR_LOCAL -> return
                   ip saddr . tcp sport . ip daddr . tcp dport @takeover_flows -> QUEUE_TAKEN
                   jump takeover_watch
    takeover_watch: the ``takeover`` filters' rules: tcp dport P / tcp sport P -> QUEUE_TAKEOVER,
                    their SYNs' MSS first clamped to nfqueue.MSS_CLAMP (segments that fit the
                    queue's copy)

Why this shape:

- -152 runs after the node's mark chains (-160, where PASS is decided) and the filters' queue
  marks (-155), so a taken-over flow's packets go to the takeover queue whatever else marked
  them, and before iptables' mangle (-150), whose static ``-m mark -j NFQUEUE`` rules read it.
- The node's segments are *not tracked*: they carry the real peers' addresses and ports, so
  conntrack would file them under the very flow they belong to, and the base table's output rule
  (``mark PASS -> ct mark PASS``) would then mark that flow's conntrack entry, after which
  prerouting would give PASS to the *peers'* packets too and let them bypass the takeover. At
  -300 (before conntrack) ``TAKEOVER_OWN`` becomes ``notrack`` plus ``PASS``: the base chains
  pass the packet and leave the flow's entry alone. A segment the node sends to a local server
  loops back through ``lo`` with its mark and stays untracked. (The base output chain's PASS
  rule reads the conntrack mark and so stops short on an untracked packet; the next rule then
  marks a protected service's segments QUEUE_STACK, which ``takeover_out`` undoes for untracked
  ones. The base rule should not depend on conntrack to accept PASS.)
- Both directions of a taken-over flow are elements of one set (an atomic element add, done
  after the first segment is out: it is not on the takeover's critical path when the flow's
  packets come to the queue already, as they do for a ``takeover`` filter's port).

Everything is nft text (the syntax ``filters.nft`` batches), applied atomically; ``setup()`` is
idempotent (its hook chains are flushed and refilled in the same batch).
"""

from __future__ import annotations

from typing import Any

from node.kernel.marks import (  # noqa: F401 - re-exported for the takeover modules
    MASK,
    PASS,
    Q_TAKEOVER,
    Q_TAKEOVERS,
    QUEUE_STACK,
    QUEUE_TAKEN,
    QUEUE_TAKEOVER,
    REPAIR_LOCAL,
    TAKEOVER_OWN,
    TAKEOVER_READERS,
)
from node.kernel.nfqueue import MSS_CLAMP
from node.kernel.nft import NftTable

TABLE = "inet herdwall"
FLOWS = "takeover_flows"
WATCH_CHAIN = "takeover_watch"
MARK_CHAIN = "takeover_mark"
RAW_PRIORITY = -300
MARK_PRIORITY = -152
COMMENT_PREFIX = "hw:"  # the filters' comment convention (filters.nft lists rules by it)

_KEEP = ~MASK & 0xFFFFFFFF


def queues(readers: int = TAKEOVER_READERS) -> dict[int, int | tuple[int, int]]:
    """The queue rules (``node.kernel.queue_rules.QueueRules(queues=...)``) for a
    ``TakeoverQueue`` with ``readers`` reader threads (1 without a thread of its own): watched
    flows fanned out by CPU to one reader each, taken-over flows to the first. They must agree:
    a queue with no reader lets its packets pass (fail-open) or drops them."""
    return {QUEUE_TAKEOVER: (Q_TAKEOVER, Q_TAKEOVER + max(1, readers) - 1),
            QUEUE_TAKEN: Q_TAKEOVER}


def set_mark(value: int) -> str:
    return f"meta mark set meta mark & {_KEEP:#010x} | {value:#010x}"


def setup() -> list[str]:
    """The takeover chains and set (idempotent statements, one batch)."""
    hooks = {"takeover_in": "input", "takeover_fwd": "forward", "takeover_out": "output"}
    lines = [
        f"add table {TABLE}",
        f"add set {TABLE} {FLOWS} {{ type ipv4_addr . inet_service . ipv4_addr . "
        "inet_service; }",
        f"add chain {TABLE} {WATCH_CHAIN}",
        f"add chain {TABLE} {MARK_CHAIN}",
        f"add chain {TABLE} takeover_raw {{ type filter hook output priority {RAW_PRIORITY}; "
        "policy accept; }",
    ]
    lines += [f"add chain {TABLE} {name} {{ type filter hook {hook} priority {MARK_PRIORITY}; "
              "policy accept; }" for name, hook in hooks.items()]
    lines += [f"flush chain {TABLE} {name}" for name in ("takeover_raw", MARK_CHAIN, *hooks)]
    lines += [
        f"add rule {TABLE} takeover_raw meta mark & {MASK:#010x} == {TAKEOVER_OWN:#010x} "
        f"notrack {set_mark(PASS)} counter comment \"takeover: the node's own segments\"",
        f"add rule {TABLE} {MARK_CHAIN} meta mark & {MASK:#010x} "
        f"{{ {PASS:#010x}, {REPAIR_LOCAL:#010x} }} return",
        f"add rule {TABLE} {MARK_CHAIN} meta l4proto tcp ip saddr . tcp sport . ip daddr . "
        f"tcp dport @{FLOWS} {set_mark(QUEUE_TAKEN)} counter return",
        f"add rule {TABLE} {MARK_CHAIN} jump {WATCH_CHAIN}",
    ]
    # The base output chain's PASS rule reads the conntrack mark, which an untracked packet
    # lacks, so the rule stops there and the next one re-marks a protected service's segments
    # QUEUE_STACK: give the node's own (untracked) segments their PASS back.
    lines.append(f"add rule {TABLE} takeover_out meta mark & {MASK:#010x} == "
                 f"{QUEUE_STACK:#010x} ct state untracked meta l4proto tcp {set_mark(PASS)} "
                 "counter return")
    lines += [f"add rule {TABLE} {name} jump {MARK_CHAIN}" for name in hooks]
    return lines


def teardown() -> list[str]:
    """Remove the takeover chains and set (the rest of the table stays)."""
    out = [f"delete chain {TABLE} {c}" for c in
           ("takeover_in", "takeover_fwd", "takeover_out", "takeover_raw", MARK_CHAIN,
            WATCH_CHAIN)]
    return [*out, f"delete set {TABLE} {FLOWS}"]


def flow_elements(client: tuple[str, int], server: tuple[str, int]) -> str:
    """Both directions of a flow as set elements (text)."""
    (c, cp), (s, sp) = client, server
    return f"{c} . {cp} . {s} . {sp}, {s} . {sp} . {c} . {cp}"


def add_flow(client: tuple[str, int], server: tuple[str, int]) -> str:
    return f"add element {TABLE} {FLOWS} {{ {flow_elements(client, server)} }}"


def delete_flow(client: tuple[str, int], server: tuple[str, int]) -> str:
    return f"delete element {TABLE} {FLOWS} {{ {flow_elements(client, server)} }}"


def watch_rules(port: int, comment: str) -> list[str]:
    """Both directions of a TCP service's traffic to the takeover queue: ``dport`` (the clients'
    segments: input on the server's host, forward on a node in the path) and ``sport`` (the
    server's: output on its host, forward in the path). Their SYNs' MSS is clamped first, so
    that segments fit the queue's copy (``nfqueue.MSS_CLAMP``; the queue drops longer ones)."""
    return [f"add rule {TABLE} {WATCH_CHAIN} tcp {field} {port} tcp flags & syn == syn "
            f"tcp option maxseg size > {MSS_CLAMP} tcp option maxseg size set {MSS_CLAMP} "
            f"comment \"{comment}\"" for field in ("dport", "sport")] + \
        [f"add rule {TABLE} {WATCH_CHAIN} tcp {field} {port} {set_mark(QUEUE_TAKEOVER)} "
         f"counter comment \"{comment}\"" for field in ("dport", "sport")]


def compile_takeover(f: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The filter action ``takeover`` for a TCP ``filters.condition.Filter``: ``(setup,
    rules)`` in ``filters.nft.Compiled``'s sense. The rules mark the service's packets for the
    takeover queue; the condition itself is checked there, in user space, on the reassembled
    stream (``TakeoverQueue`` with the filter in its ``UserspaceFilters``)."""
    if f.proto != "tcp":
        raise ValueError("takeover is a TCP action (UDP filters drop)")
    return tuple(setup()), tuple(watch_rules(f.port, f"{COMMENT_PREFIX}{f.filter_id}"))


class NftText:
    """The node's ``NftTable`` in text batches (the takeover's chains and sets), in a namespace
    or where the caller is."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.table = NftTable(netns)

    def apply(self, lines: list[str] | str) -> None:
        self.table.apply_text(lines if isinstance(lines, str) else "\n".join(lines) + "\n")

    def query(self, cmd: str) -> dict[str, Any]:
        return self.table.query_text(cmd)

    def counters(self) -> dict[str, int]:
        """Packets counted by the takeover chains' rules, by ``chain:index``."""
        out: dict[str, int] = {}
        items = self.query(f"list table {TABLE}").get("nftables", [])
        idx: dict[str, int] = {}
        for item in items:
            rule = item.get("rule") if isinstance(item, dict) else None
            if not isinstance(rule, dict) or not str(rule.get("chain", "")).startswith(
                    "takeover"):
                continue
            chain = rule["chain"]
            i = idx[chain] = idx.get(chain, -1) + 1
            for e in rule.get("expr", []):
                if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                    out[f"{chain}:{i}"] = int(e["counter"].get("packets", 0))
        return out
