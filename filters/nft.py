"""Filters in the kernel: compile to nftables and install in table ``inet herdwall``.

What nftables can say goes into the kernel: specific filters on datagrams as elements of typed
sets (``typeof udp dport . @ih,OFF,LEN``: 10,000 elements cost nothing on the fast path), general
filters on datagrams as one rule of fixed-offset ``@ih`` comparisons. What it cannot say is
checked in user space: the filter is an element of its port's set ``uq_PROTO_PORT``, whose one
rule marks the port's packets for the stack's queue (one rule per port, however many filters:
every rule in a chain costs every packet that passes it), and ``filters.userspace`` applies
the same condition there. That is a field after a delimiter, a
length in little-endian, a specific value longer than ``MAX_SET_BYTES`` (a longer set key
aborts libnftables 1.0.6, in our process), and every TCP filter: ``@ih`` counts from each
segment's payload, not from the stream's start, so a specific filter there would compare bytes
at the wrong place of every later segment (and drop benign bulk data that happens to hold them).

Every change is one libnftables batch, all-or-nothing. The batches are nft's text syntax: this
libnftables (1.0.6) cannot express typeof sets over raw payload in its JSON input, and a text
buffer is applied as one transaction just the same. Listing reads JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .condition import Filter, General, Specific

TABLE = "inet herdwall"
RULES_CHAIN = "filters"
QUEUE_CHAIN = "filter_queue"
COMMENT_PREFIX = "hw:"
MAX_RULE_COMPARISONS = 256  # beyond this a general filter is checked in user space
# A set key is the port and the value, in nft's 64 bytes of registers; a longer one makes
# libnftables abort (an assertion) instead of refusing the batch.
MAX_SET_BYTES = 48
# Before the stock filter hooks (0), so a drop here wins. The queue mark is set on input and
# forward after the node's own mark chains (-160, where PASS is decided) and before iptables'
# mangle table (-150), whose static NFQUEUE rules match marks.
FILTER_PRIORITY = -5
QUEUE_PRIORITY = -155


class NftError(RuntimeError):
    """libnftables refused a batch (nothing of it was applied)."""


Apply = Callable[[str], None]  # run one text batch atomically, raise NftError on failure
# A filter -> (setup, rules) text statements that hand its TCP flows to the takeover.
TakeoverCompiler = Callable[[Filter], tuple[Iterable[str], Iterable[str]]]
Query = Callable[[str], dict[str, object]]  # run a list command, return its JSON output


@dataclass(frozen=True, slots=True)
class Compiled:
    """A filter's kernel part: ``setup`` statements are idempotent (sets), ``rules`` are the
    filter's own rules and elements; ``userspace`` says whether the condition (or part of it)
    must be checked on the queue path."""

    filter: Filter
    setup: tuple[str, ...]
    rules: tuple[str, ...]
    userspace: bool
    element: tuple[str, str] | None = None  # (set, element): batched per set when installed
    set_rule: str | None = None  # the element's set's one rule, added with its first element

    @property
    def statements(self) -> tuple[str, ...]:
        """What installing this filter alone into an empty table would run."""
        return self.setup + ((self.set_rule,) if self.set_rule else ()) + self.rules


def _comment(f: Filter) -> str:
    return f'comment "{COMMENT_PREFIX}{f.filter_id}"'


def _action(f: Filter, tcp_action: str) -> str:
    return "drop" if f.proto == "udp" else tcp_action


def specific_set(f: Filter) -> tuple[str, int, int]:
    assert isinstance(f.condition, Specific)
    off, length = f.condition.offset * 8, len(f.condition.value) * 8
    return f"spec_{f.proto}_{off}_{length}", off, length


def compile_filter(f: Filter, *, queue_mark: int, mark_mask: int = 0xFFFFFFFF,
                   tcp_action: str = "reject with tcp reset",
                   takeover: TakeoverCompiler | None = None) -> Compiled:
    """``queue_mark`` under ``mark_mask`` is what the stack's static NFQUEUE rule takes; a
    packet that already carries a mark under the mask (the node's own, PASS) keeps it.
    ``tcp_action="takeover"``: TCP filters hand their flows to the node's takeover, whose rules
    ``takeover`` (``node.takeover.rules.compile_takeover``) makes; the condition is then checked
    on the takeover's queue."""
    if tcp_action == "takeover" and f.proto == "tcp":
        if takeover is None:
            raise ValueError("the takeover action needs the node's takeover rule compiler")
        setup, rules = takeover(f)
        return Compiled(f, tuple(setup), tuple(rules), userspace=True)
    c = f.condition
    if isinstance(c, Specific) and f.proto == "udp" and 0 < len(c.value) <= MAX_SET_BYTES:
        name, off, length = specific_set(f)
        value = int.from_bytes(c.value, "big")
        setup = (
            f"add set {TABLE} {name} {{ typeof {f.proto} dport . @ih,{off},{length}; counter; }}",
        )
        element = f"{f.port} . {value:#x} {_comment(f)}"
        rule = (f"add rule {TABLE} {RULES_CHAIN} {f.proto} dport . @ih,{off},{length} @{name} "
                f"{_action(f, tcp_action)} comment \"set:{name}\"")
        return _element(f, setup, name, element, rule, userspace=False)
    exprs = _general_exprs(c) if isinstance(c, General) else None
    if f.proto == "udp" and exprs is not None:
        rule = (f"add rule {TABLE} {RULES_CHAIN} udp dport {f.port} {' '.join(exprs)} "
                f"counter {_action(f, tcp_action)} {_comment(f)}")
        return Compiled(f, (), (rule,), userspace=False)
    # The set is a register of the port's user-space filters (no rule looks into it): an
    # element per filter, named by the filter's id written as an address.
    name = f"uq_{f.proto}_{f.port}"
    keep = ~mark_mask & 0xFFFFFFFF
    mark = (f"add rule {TABLE} {QUEUE_CHAIN} meta mark & {mark_mask:#010x} == 0 "
            f"{f.proto} dport {f.port} meta mark set meta mark & {keep:#010x} | "
            f"{queue_mark & mark_mask:#010x} counter comment \"set:{name}\"")
    fid = f.filter_id
    element = f"::{fid[:4]}:{fid[4:8]}:{fid[8:12]}:{fid[12:]} {_comment(f)}"
    return _element(f, (f"add set {TABLE} {name} {{ type ipv6_addr; }}",), name, element, mark,
                    userspace=True)


def _element(f: Filter, setup: tuple[str, ...], name: str, element: str, rule: str, *,
             userspace: bool) -> Compiled:
    return Compiled(f, setup, (f"add element {TABLE} {name} {{ {element} }}",), userspace,
                    (name, element), rule)


def _general_exprs(c: General) -> list[str] | None:
    """Fixed-offset comparisons equivalent to ``c`` on a datagram, or None if nft can't say it."""
    o = c.overflow
    if c.sliding or o.field.delimiter is not None or o.kind != "terminated":
        return None
    if o.reach * len(o.terminators) + len(c.pins) > MAX_RULE_COMPARISONS:
        return None
    start = o.field.offset
    # The datagram must hold the whole field: udp length counts its 8-byte header.
    exprs = [f"udp length >= {8 + start + o.reach}"]
    exprs += [f"@ih,{p.offset * 8},8 {p.value:#04x}" for p in c.pins]
    for i in range(start, start + o.reach):
        exprs += [f"@ih,{i * 8},8 != {t:#04x}" for t in o.terminators]
    return exprs


def base_chains() -> list[str]:
    """The filter chains, made once per table: one regular chain holds the rules, jumped to
    from input (filters protecting this host) and forward (a node in the path)."""
    return [
        f"add table {TABLE}",
        f"add chain {TABLE} {RULES_CHAIN}",
        f"add chain {TABLE} filter_in {{ type filter hook input priority {FILTER_PRIORITY}; "
        "policy accept; }",
        f"add chain {TABLE} filter_fwd {{ type filter hook forward priority {FILTER_PRIORITY}; "
        "policy accept; }",
        f"add rule {TABLE} filter_in jump {RULES_CHAIN}",
        f"add rule {TABLE} filter_fwd jump {RULES_CHAIN}",
        f"add chain {TABLE} {QUEUE_CHAIN}",
        f"add chain {TABLE} filter_queue_in {{ type filter hook input priority "
        f"{QUEUE_PRIORITY}; policy accept; }}",
        f"add chain {TABLE} filter_queue_fwd {{ type filter hook forward priority "
        f"{QUEUE_PRIORITY}; policy accept; }}",
        f"add rule {TABLE} filter_queue_in jump {QUEUE_CHAIN}",
        f"add rule {TABLE} filter_queue_fwd jump {QUEUE_CHAIN}",
    ]


@dataclass(frozen=True, slots=True)
class Installed:
    filter_id: str
    packets: int
    bytes: int


class FilterTable:
    """install / remove / list / sync of filters in the kernel, each one atomic batch.

    ``apply`` and ``query`` drive libnftables (the node passes its ``NftTable.apply_text`` and
    ``query_text``); ``queue_mark``
    is the mark the stack's static NFQUEUE rule takes."""

    def __init__(self, apply: Apply, query: Query, *, queue_mark: int,
                 mark_mask: int = 0xFFFFFFFF, tcp_action: str = "reject with tcp reset",
                 takeover: TakeoverCompiler | None = None) -> None:
        self._apply = apply
        self._query = query
        self.queue_mark = queue_mark
        self.mark_mask = mark_mask
        self.takeover = takeover
        self.tcp_action = tcp_action
        # What the last listing showed, kept up to date by our own batches: an install then
        # needs no listing (a listing cost 2-2.5 ms of a 3 ms install on an alert's path, and
        # grows with the table). Dropped when a batch fails; every listing renews it.
        self._view: _View | None = None

    @property
    def knows_table(self) -> bool:
        """Whether an install needs no listing first (``install(..., look=False)`` works)."""
        return self._view is not None

    def _ruleset(self) -> list[dict[str, object]]:
        try:
            out = self._query(f"list table {TABLE}")
        except NftError:
            items: object = []
        else:
            items = out.get("nftables", [])
        listed = items if isinstance(items, list) else []
        self._view = _View.of(listed)
        return listed

    def _batch(self, install: Iterable[Filter], remove: Iterable[str],
               items: list[dict[str, object]] | None, compiled: list[Compiled] | None = None,
               view: _View | None = None) -> tuple[str, set[str]]:
        """The text batch, and the sets whose rule it deletes; the removals need the listed
        ``items`` (their handles), an install alone only the ``view`` of what is there."""
        if view is None:
            view = _View.of(items or [])
        lines: list[str] = [] if view.chains else base_chains()
        gone = set(remove)
        left: dict[str, int] = {}  # elements per set after the removals
        rule_of: dict[str, object] = {}
        for kind, key, handle, spec in _entries(items or []):
            if kind == "rule" and key in gone:
                lines.append(f"delete rule {TABLE} {spec} handle {handle}")
            elif kind == "elem":
                name = _set_name(spec)
                left[name] = left.get(name, 0) + (key not in gone)
                if key in gone:
                    lines.append(f"delete element {TABLE} {spec}")
            elif kind == "setrule":
                rule_of[spec] = handle
        set_rules = set(view.set_rules)
        # Elements go in one statement per set: 10,000 in one statement load in tens of ms,
        # 10,000 statements take ten times longer.
        elements: dict[str, list[str]] = {}
        for f in install:
            c = compile_filter(f, queue_mark=self.queue_mark, mark_mask=self.mark_mask,
                               tcp_action=self.tcp_action, takeover=self.takeover)
            if compiled is not None:
                compiled.append(c)
            lines += [s for s in c.setup if s not in lines]
            if c.element is None:
                lines += c.rules
                continue
            name = c.element[0]
            if name not in set_rules and c.set_rule is not None:
                set_rules.add(name)
                lines.append(c.set_rule)
            elements.setdefault(name, []).append(c.element[1])
        lines += [f"add element {TABLE} {name} {{ {', '.join(es)} }}"
                  for name, es in elements.items()]
        # A port left with no user-space filter stops handing its packets to the queue (a
        # specific set's rule may stay: an empty set costs a lookup, a queue rule a detour).
        unruled = {name for name, n in left.items() if not n and name.startswith("uq_")
                   and name not in elements and name in rule_of}
        lines += [f"delete rule {TABLE} {QUEUE_CHAIN} handle {rule_of[name]}"
                  for name in sorted(unruled)]
        return "\n".join(lines) + "\n", unruled

    def install(self, filters: Iterable[Filter], *, look: bool = True) -> list[Compiled]:
        """Install what is not installed yet; returns what was compiled and added.
        ``look=False``: one batch from what the table is known to hold, never a listing (it
        grows with the table): ``NftError`` if that is not known or the batch fails."""
        fs = list(filters)
        view, listed = self._view, False
        if view is None:
            if not look:
                raise NftError("what the table holds is not known: it must be listed first")
            self._ruleset()
            view, listed = self._view, True
        assert view is not None
        new = [f for f in fs if f.filter_id not in view.ids]
        compiled: list[Compiled] = []
        if not new:
            return compiled
        try:
            self._apply(self._batch(new, (), None, compiled, view)[0])
        except NftError:
            self._view = None
            if listed or not look:
                raise
            # The table changed behind our back (an operator, a teardown): look, then retry.
            return self.install(fs)
        view.after(new, (), compiled)
        return compiled

    def _apply_listed(self, batch: tuple[str, set[str]], add: list[Filter], drop: list[str],
                      compiled: list[Compiled]) -> None:
        """Apply a batch made from a listing; the view then is what the listing showed with
        the batch's changes (the next install needs no listing: after an operator's removal
        one took 2 ms of CPU on the next alert's path)."""
        view, self._view = self._view, None
        text, unruled = batch
        self._apply(text)
        if view is not None:
            view.after(add, drop, compiled)
            view.set_rules -= unruled
            self._view = view

    def remove(self, filter_ids: Iterable[str]) -> None:
        ids = list(filter_ids)
        if ids:
            self._apply_listed(self._batch((), ids, self._ruleset()), [], ids, [])

    def sync(self, desired: Iterable[Filter]) -> None:
        """Make the kernel hold exactly ``desired``: one batch of removals and additions."""
        want = {f.filter_id: f for f in desired}
        items = self._ruleset()  # one listing: what is there, and the handles to remove
        have = self._view
        assert have is not None
        # What an older herdwall installed in another shape (a TCP specific filter as a set
        # element matched per segment, a user-space filter as a rule of its own) is replaced.
        placed = {key: _set_name(spec) if kind == "elem" else None
                  for kind, key, _, spec in _entries(items) if kind in ("rule", "elem")}
        stale = [fid for fid, f in want.items() if fid in placed and placed[fid] != self._set_of(f)]
        add = [f for fid, f in want.items() if fid not in have.ids or fid in stale]
        drop = [fid for fid in have.ids if fid not in want] + stale
        if add or drop or not have.chains:
            compiled: list[Compiled] = []
            self._apply_listed(self._batch(add, drop, items, compiled), add, drop, compiled)

    def _set_of(self, f: Filter) -> str | None:
        """The set whose element ``f`` is, as this herdwall compiles it (None: rules)."""
        c = compile_filter(f, queue_mark=self.queue_mark, mark_mask=self.mark_mask,
                           tcp_action=self.tcp_action, takeover=self.takeover)
        return c.element[0] if c.element is not None else None

    def list(self) -> list[Installed]:
        out: dict[str, Installed] = {}
        for kind, key, counters, _ in _entries(self._ruleset(), with_counters=True):
            if kind in ("rule", "elem") and key:
                p, b = counters  # type: ignore[misc]
                prev = out.get(key)
                out[key] = Installed(key, p + (prev.packets if prev else 0),
                                     b + (prev.bytes if prev else 0))
        return list(out.values())


@dataclass(slots=True)
class _View:
    """What the table holds, as far as an install needs to know."""

    chains: bool
    set_rules: set[str]  # the sets that have their rule (``set:NAME`` comments)
    ids: set[str]  # filters with a rule or an element

    def after(self, add: Iterable[Filter], drop: Iterable[str],
              compiled: Iterable[Compiled]) -> None:
        """What a batch that added ``add`` and removed ``drop`` left (set rules stay)."""
        self.ids.difference_update(drop)
        self.ids.update(f.filter_id for f in add)
        self.set_rules.update(c.element[0] for c in compiled if c.element is not None)
        self.chains = True

    @classmethod
    def of(cls, items: list[dict[str, object]]) -> _View:
        chains = any(isinstance(i.get("chain"), dict) and i["chain"].get("name") == RULES_CHAIN
                     for i in items)
        entries = list(_entries(items))
        return cls(chains, {spec for kind, _, _, spec in entries if kind == "setrule"},
                   {key for kind, key, _, _ in entries if kind in ("rule", "elem")})


def _entries(items: list[dict[str, object]], with_counters: bool = False
             ) -> Iterable[tuple[str, str, object, str]]:
    """(kind, filter id, handle or counters, where) for the filter parts in a listed table."""
    for item in items:
        rule = item.get("rule")
        if isinstance(rule, dict):
            comment = str(rule.get("comment", ""))
            if comment.startswith("set:"):
                yield "setrule", "", rule.get("handle"), comment[4:]
            elif comment.startswith(COMMENT_PREFIX):
                counters = _counter(rule.get("expr", []))
                yield ("rule", comment[len(COMMENT_PREFIX):],
                       counters if with_counters else rule.get("handle"), str(rule.get("chain")))
        s = item.get("set")
        if isinstance(s, dict):
            for e in s.get("elem", []) or []:
                elem = e.get("elem") if isinstance(e, dict) else None
                if not isinstance(elem, dict):
                    continue
                comment = str(elem.get("comment", ""))
                if not comment.startswith(COMMENT_PREFIX):
                    continue
                val = elem.get("val", {})
                concat = val.get("concat", []) if isinstance(val, dict) else [val]
                counter = elem.get("counter") or {}
                counters = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
                where = f"{s.get('name')} {{ {' . '.join(_nft_value(v) for v in concat)} }}"
                yield ("elem", comment[len(COMMENT_PREFIX):],
                       counters if with_counters else None, where)


def _set_name(where: str) -> str:
    """The set of an element as ``_entries`` gives its place (``NAME { value }``)."""
    return where.split(" ", 1)[0]


def _nft_value(v: object) -> str:
    if isinstance(v, int) and v < 0:
        v += 1 << 64  # nft's JSON lists a 64-bit value with its top bit set as a signed one
    return f"{v:#x}" if isinstance(v, int) and v > 65535 else str(v)


def _counter(exprs: object) -> tuple[int, int]:
    if isinstance(exprs, list):
        for e in exprs:
            if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                return int(e["counter"].get("packets", 0)), int(e["counter"].get("bytes", 0))
    return 0, 0
