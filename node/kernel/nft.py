"""The ``inet herdwall`` nftables table, driven through libnftables' JSON API.

Where the chains sit, and why (priorities on the netfilter hooks, lower runs first)::

    hook         -400 defrag   -200 conntrack   -160 inet herdwall   -150 iptables mangle
    prerouting       x              x                 x (restore PASS)
    input                                             x (mark)            x NFQUEUE rules
    forward                                           x (mark)            x NFQUEUE rules
    output                          x                 x (mark)            x NFQUEUE rules

- After conntrack (-200) so ``ct state`` and ``ct mark`` are known; before iptables' mangle
  chains (-150) where ``node.kernel.queue_rules`` puts the static ``-m mark ... -j NFQUEUE``
  rules, so the mark decided here is the one they see. (This kernel has no nft ``queue``
  statement, hence the split.)
- Marks are decided on input, forward and output, the three hooks of which every packet crosses
  exactly one, and the queue rules sit on the same three: a packet is queued at most once even
  though its mark stays with it. Prerouting only restores ``PASS`` from the conntrack mark.
- Every change is one JSON batch, which libnftables applies all-or-nothing; a failed batch
  raises ``NftError`` with libnftables' message and leaves the previous ruleset whole.

Layout made by :meth:`NftTable.ensure` (see ``node.kernel.marks`` for the values)::

    set stack_ports { type inet_proto . inet_service }   # protected (proto, port) pairs
    counters pass, stack_queued, stack_invalid
    prerouting: ct mark PASS                      -> mark PASS        (replies to own sockets)
    input:      mark PASS                         -> accept
                l4proto . dport @stack_ports, ct state invalid -> drop
                l4proto . dport @stack_ports, TCP SYN -> MSS at most MSS_CLAMP
                l4proto . dport @stack_ports      -> mark QUEUE_STACK
    forward:    mark PASS                         -> accept
    output:     mark PASS (SO_MARK)               -> ct mark PASS, accept
                l4proto . sport @stack_ports, TCP SYN -> MSS at most MSS_CLAMP
                l4proto . sport @stack_ports      -> mark QUEUE_STACK  (service replies)

Invalid packets to protected ports are dropped because conntrack's checks include the TCP/UDP
checksum (``nf_conntrack_checksum``): the service's kernel would drop them anyway, and dropping
them here means the stack never needs to check checksums in Python on this path.

Other components add their own rules with :meth:`NftTable.add_rule` (appended after the ones
above, so ``PASS`` always wins) and their own sets with :meth:`NftTable.add_set`; the expression
helpers below build the masked mark matches and sets.

Namespaces: ``NftTable(netns="hw-...")`` creates its libnftables context and runs every command
with the calling thread moved into that namespace (``setns``); ``netns=None`` acts where the
calling thread is (a real node).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

from filters.nft import NftError as FilterNftError
from node.kernel.marks import MASK, PASS, QUEUE_STACK
from node.kernel.nfqueue import MSS_CLAMP

FAMILY = "inet"
TABLE = "herdwall"
PRIORITY = -160
CHAINS: dict[str, tuple[str, str]] = {  # name: (type, hook)
    "prerouting": ("filter", "prerouting"),
    "input": ("filter", "input"),
    "forward": ("filter", "forward"),
    "output": ("route", "output"),  # route: a changed mark re-routes (policy routing by mark)
}
STACK_PORTS = "stack_ports"
COUNTERS = ("pass", "stack_queued", "stack_invalid")

Json = dict[str, Any]


class NftError(FilterNftError):
    """libnftables refused a batch; ``str()`` is its error text. (One error type with the
    filters' installer, which runs its batches through this table.)"""


# --------------------------------------------------------------------------- expressions

def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def ct(key: str) -> Json:
    return {"ct": {"key": key}}


def mark_is(value: int, key: Json | None = None) -> Json:
    """Match herdwall's bits of the packet mark (or of ``key``, e.g. ``ct("mark")``)."""
    return {"match": {"op": "==", "left": {"&": [key or meta("mark"), MASK]}, "right": value}}


def set_mark(value: int, key: str = "meta") -> Json:
    """Set herdwall's bits of the packet mark (``key="ct"``: the conntrack mark), keeping the
    others."""
    target = meta("mark") if key == "meta" else ct("mark")
    return {"mangle": {"key": target,
                       "value": {"|": [{"&": [target, ~MASK & 0xFFFFFFFF]}, value]}}}


def in_set(left: Json, set_name: str) -> Json:
    return {"match": {"op": "==", "left": left, "right": f"@{set_name}"}}


def l4_port(field: str) -> Json:
    """``meta l4proto . th <field>``: (protocol, port) for any transport with ports."""
    return {"concat": [meta("l4proto"), {"payload": {"protocol": "th", "field": field}}]}


def counter(name: str) -> Json:
    return {"counter": name}


ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}
CT_INVALID: Json = {"match": {"op": "in", "left": ct("state"), "right": "invalid"}}
_MSS: Json = {"tcp option": {"name": "maxseg", "field": "size"}}
_TCP_SYN: Json = {"match": {"op": "==", "right": "syn", "left": {
    "&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "syn"]}}}


def clamp_mss(*match: Json) -> list[Json]:
    """A TCP SYN (or SYN-ACK) that ``match`` selects gets an MSS option larger than
    ``nfqueue.MSS_CLAMP`` set to it: the peer's segments then fit the queue's copy range, which a
    queue callback has to drop whole when they do not (what it cannot see it cannot check)."""
    return [*match, _TCP_SYN, {"match": {"op": ">", "left": _MSS, "right": MSS_CLAMP}},
            {"mangle": {"key": _MSS, "value": MSS_CLAMP}}]
CT_TRACKED: Json = {"match": {"op": "!=", "left": ct("state"), "right": "untracked"}}


# --------------------------------------------------------------------------- the table

class NftTable:
    """Owner of ``table inet herdwall``."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        with self._where():
            import nftables  # the binding over Debian's libnftables1

            self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)

    @contextlib.contextmanager
    def _where(self) -> Iterator[None]:
        if self.netns is None:
            yield
            return
        from node.testbed.netns import Namespace

        with Namespace.attach(self.netns).enter():
            yield

    def _base(self, **kw: Any) -> Json:
        return {"family": FAMILY, "table": TABLE, **kw}

    # -- raw access

    def apply(self, commands: Iterable[Json]) -> list[Json]:
        """Run ``commands`` (libnftables JSON objects such as ``{"add": {...}}``) as one atomic
        batch; return libnftables' JSON output items. Raises ``NftError`` on refusal."""
        batch = {"nftables": list(commands)}
        with self._where():
            rc, out, err = self._nft.json_cmd(batch)
        if rc != 0:
            raise NftError((err or "libnftables failed").strip())
        return out.get("nftables", []) if isinstance(out, dict) else []

    def list(self, what: Json) -> list[Json]:
        return self.apply([{"list": what}])

    def apply_text(self, batch: str) -> None:
        """Run a batch in nft's text syntax, also one atomic transaction: this libnftables
        (1.0.6) cannot say typeof sets over raw payload in JSON, which filters need."""
        with self._where():
            self._nft.set_json_output(False)
            try:
                rc, _, err = self._nft.cmd(batch)
            finally:
                self._nft.set_json_output(True)
        if rc != 0:
            raise NftError((err or "libnftables failed").strip())

    def query_text(self, command: str) -> dict[str, Any]:
        """A list command in text syntax, its output as JSON."""
        with self._where():
            rc, out, err = self._nft.cmd(command)
        if rc != 0:
            raise NftError((err or "libnftables failed").strip())
        return json.loads(out) if out else {}

    # -- life cycle

    def exists(self) -> bool:
        try:
            self.list({"table": {"family": FAMILY, "name": TABLE}})
        except NftError:
            return False
        return True

    def ensure(self) -> bool:
        """Create the table with its base chains, set, counters and rules if it is missing.
        Returns True if it was created (one atomic batch), False if it was there."""
        if self.exists():
            have = {c["chain"]["name"] for c in self.list({"chains": {"family": FAMILY}})
                    if "chain" in c and c["chain"]["table"] == TABLE}
            missing = set(CHAINS) - have
            if missing:
                raise NftError(f"table {FAMILY} {TABLE} exists without chains {sorted(missing)}"
                               "; run teardown first")
            return False
        self.apply(self.layout())
        return True

    def layout(self) -> list[Json]:
        cmds: list[Json] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
        for name, (typ, hook) in CHAINS.items():
            cmds.append({"add": {"chain": self._base(name=name, type=typ, hook=hook,
                                                     prio=PRIORITY, policy="accept")}})
        cmds.append({"add": {"set": self._base(name=STACK_PORTS,
                                               type=["inet_proto", "inet_service"])}})
        cmds += [{"add": {"counter": self._base(name=c)}} for c in COUNTERS]
        rule = self._rule_cmd
        cmds += [
            rule("prerouting", [mark_is(PASS, ct("mark")), set_mark(PASS)],
                 "replies to the node's own connections pass"),
            rule("input", [mark_is(PASS), counter("pass"), ACCEPT]),
            rule("input", [in_set(l4_port("dport"), STACK_PORTS), CT_INVALID,
                           counter("stack_invalid"), DROP],
                 "bad checksum or state: the service's kernel drops these too"),
            rule("input", clamp_mss(in_set(l4_port("dport"), STACK_PORTS)),
                 "segments that fit the queue's copy"),
            rule("input", [in_set(l4_port("dport"), STACK_PORTS), counter("stack_queued"),
                           set_mark(QUEUE_STACK)], "protected services: user-level stack"),
            rule("forward", [mark_is(PASS), counter("pass"), ACCEPT]),
            # Two rules: setting the conntrack mark fails on untracked packets (the takeover's
            # raw segments), which would end the rule before its accept.
            rule("output", [mark_is(PASS), CT_TRACKED, set_mark(PASS, "ct")],
                 "remember the node's own connections, for their replies"),
            rule("output", [mark_is(PASS), counter("pass"), ACCEPT],
                 "the node's own sockets (SO_MARK)"),
            rule("output", clamp_mss(in_set(l4_port("sport"), STACK_PORTS)),
                 "segments that fit the queue's copy"),
            rule("output", [in_set(l4_port("sport"), STACK_PORTS), counter("stack_queued"),
                            set_mark(QUEUE_STACK)], "replies of protected services"),
        ]
        return cmds

    def teardown(self) -> bool:
        """Delete the whole table (everything herdwall put in nftables). True if it existed."""
        if not self.exists():
            return False
        self.apply([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
        return True

    # -- rules and sets

    def _rule_cmd(self, chain: str, expr: list[Json], comment: str | None = None,
                  verb: str = "add") -> Json:
        body = self._base(chain=chain, expr=expr)
        if comment:
            body["comment"] = comment
        return {verb: {"rule": body}}

    def add_rule(self, chain: str, expr: list[Json], comment: str | None = None) -> None:
        """Append a rule to one of the chains (after the PASS and stack rules)."""
        self.apply([self._rule_cmd(chain, expr, comment)])

    def add_set(self, name: str, type: str | list[str], *, flags: list[str] | None = None,
                timeout: int | None = None) -> None:
        body = self._base(name=name, type=type)
        if flags:
            body["flags"] = flags
        if timeout is not None:
            body["timeout"] = timeout
        self.apply([{"add": {"set": body}}])

    def element_cmd(self, verb: str, set_name: str, elements: Iterable[Any]) -> Json:
        """An ``add``/``delete`` element command, for batching with others. Concatenated
        elements are given as tuples/lists, e.g. ``("tcp", 80)`` or ``("10.77.0.1",
        "10.77.0.2")``."""
        elem = [{"concat": list(e)} if isinstance(e, tuple | list) else e for e in elements]
        return {verb: {"element": self._base(name=set_name, elem=elem)}}

    def add_elements(self, set_name: str, elements: Iterable[Any]) -> None:
        elems = list(elements)
        if elems:
            self.apply([self.element_cmd("add", set_name, elems)])

    def delete_elements(self, set_name: str, elements: Iterable[Any]) -> None:
        elems = list(elements)
        if elems:
            self.apply([self.element_cmd("delete", set_name, elems)])

    def list_set(self, set_name: str) -> list[Any]:
        """The set's elements (concatenations as tuples)."""
        out = self.list({"set": self._base(name=set_name)})
        for item in out:
            if "set" in item:
                return [tuple(e["concat"]) if isinstance(e, dict) and "concat" in e else e
                        for e in item["set"].get("elem", [])]
        return []

    def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters of the table: name -> (packets, bytes)."""
        out = self.list({"counters": {"family": FAMILY}})
        return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
                for c in out if "counter" in c and c["counter"]["table"] == TABLE}

    # -- the stack's protected ports

    def protect(self, proto: str, port: int) -> None:
        """Send traffic of (proto, port) through the user-level stack (both directions)."""
        self.add_elements(STACK_PORTS, [(proto, port)])

    def unprotect(self, proto: str, port: int) -> None:
        self.delete_elements(STACK_PORTS, [(proto, port)])

    def protected(self) -> list[tuple[str, int]]:
        return [tuple(e) for e in self.list_set(STACK_PORTS)]  # type: ignore[misc]
