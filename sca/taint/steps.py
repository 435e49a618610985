"""Per-address step functions for the taint engine: every decoded instruction gets one
function, generated once, with the fast-path test, its operands' registers, byte slices and
sizes written into its source as constants.

An HTTP replay spent ~8 us of Python per tainted instruction in generic handlers that looked
at each operand's kind at run time (a dozen calls and list copies for ``pcmpeqb xmm1, xmm0``).
The shapes that dominate real services (register/memory moves, zero and sign extension,
two-operand ALU and compares, shifts by a constant, bit scans and mask extractions) get their
handler inlined in the step's source; every other instruction calls the engine's generic
handler. Both give the same labels: the generated code is the generic handlers' rules with the
operand dispatch done once. Sources repeat across addresses (same shape, same registers), so
each distinct one is compiled once per process.

Contract with the engine: a step function takes the next instruction's address; ``regs``
holds only lists no one else references (they are updated in place), ``mem``/``lines`` and the
memory event lists are the tracker's own objects for its whole life (cleared, never replaced).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from . import decode as d
from .decode import Insn, Operand
from .regs import full_size

if TYPE_CHECKING:
    from .engine import Label, TaintTracker

X86_OP_REG, X86_OP_MEM, X86_OP_IMM = 1, 3, 2
LINE_SHIFT = 6
LINE = 1 << LINE_SHIFT

Step = Callable[[int], None]
Labels = list["Label"]
_FLAG_READERS = frozenset({d.JCC, d.SETCC, d.CMOV})
_FLAG_SETTERS = frozenset({d.ALU, d.CMP, d.UNARY, d.SCAS, d.SMEAR, d.GENERIC})
SHIFTS = frozenset({"shl", "sal", "shr", "sar", "rol", "ror"})
_KEEP_BYTES = frozenset({"inc", "dec", "neg", "not"})


def first(labels: Labels) -> Label:
    for x in labels:
        if x is not None:
            return x
    return None


def span(events: list[tuple[int, int]], start: int, size: int) -> tuple[int, int] | None:
    """One operand's access from ``start`` on: unicorn reports a wide access (a 16-byte vector
    store, a page-crossing load) as several contiguous smaller ones."""
    if start >= len(events):
        return None
    a, n = events[start]
    i = start + 1
    while n < size and i < len(events) and events[i][0] == a + n:
        n += events[i][1]
        i += 1
    return a, n


def shift_labels(labels: Labels, m: str, count: int) -> Labels:
    """Byte labels after a shift or rotate by a constant: whole-byte moves stay exact (strcpy
    implementations walk a loaded word with ``shr $16``); a partial byte mixes two neighbours."""
    n = len(labels)
    q, r = divmod(count, 8)

    def at(i: int) -> Label:
        if m in ("rol", "ror"):
            return labels[i % n]
        if 0 <= i < n:
            return labels[i]
        return labels[-1] if m == "sar" and i >= n else None

    out: Labels = []
    for i in range(n):
        if m in ("shr", "sar", "ror"):
            a, b = at(i + q), at(i + q + 1) if r else None
        else:
            a, b = at(i - q), at(i - q - 1) if r else None
        out.append(a if a is not None else b)
    return out


def fit(labels: Labels, n: int) -> Labels:
    """``labels`` cut or padded with clean bytes to exactly ``n``."""
    k = len(labels)
    if k == n:
        return labels
    return labels[:n] if k > n else labels + [None] * (n - k)


def _named(op: Operand) -> bool:
    return op.kind == X86_OP_REG and bool(op.reg)


def build(tr: TaintTracker, insn: Insn, generic: Step) -> Step:
    """The step of ``insn``: the fast-path test (no tainted register named, no tainted flags
    read, no line that held taint touched: nothing to move, at most the flags get clean), then
    its inlined handler or a call of ``generic``."""
    # Everything the source depends on (a memory operand's base and a displacement do not):
    # instructions of one shape share one factory, made on the first.
    key = (insn.kind, insn.mnemonic, insn.vex, insn.touches_mem, bool(insn.regnames), insn.reads,
           insn.writes, tuple((o.kind, o.size, o.reg, o.off, o.width, o.imm) for o in insn.ops))
    made = _FACTORIES.get(key)
    if made is None:
        made = _FACTORIES[key] = _make(insn)
    factory, consts = made
    dst = insn.ops[0] if insn.ops else None
    put_mem = _mem_setter(tr, dst.size) if dst is not None and dst.kind == X86_OP_MEM else None
    return factory(tr, insn.regnames, generic, tr.cmp_handler(insn), put_mem, *consts)


_FACTORIES: dict[tuple[object, ...], tuple[Callable[..., Step], list[str]]] = {}


def _make(insn: Insn) -> tuple[Callable[..., Step], list[str]]:
    body = _body(insn) or ["handler(next_address)"]
    test = ["not (lines and (reads or writes) and hot())"]
    if insn.kind in _FLAG_READERS:
        test.insert(0, "tr.flags is None")
    if insn.regnames:
        test.insert(0, "rkeys.isdisjoint(names)")
    clean = ["tr.flags = None", "tr.last_cmp = None"] if insn.kind in _FLAG_SETTERS else []
    source = "\n".join([
        "def step(next_address):",
        f"    if {' and '.join(test)}:",
        *_indent(clean, 2),
        "        return",
        "    tr.tainted_count += 1",
        *_indent(body, 1),
    ])
    # Register names (and a shift's mnemonic) become the factory's arguments, so one source
    # serves every register (compiling ~0.5 ms each made the first HTTP replay 0.1 s slower).
    consts: list[str] = []

    def const(m: re.Match[str]) -> str:
        if m.group(1) not in consts:
            consts.append(m.group(1))
        return f"K{consts.index(m.group(1))}"

    source = re.sub(r"'(\w+)'", const, source)
    return _factory(source, len(consts)), consts


@cache
def _factory(source: str, n_consts: int) -> Callable[..., Step]:
    """Compiles a step's source once; the returned factory binds it to a tracker."""
    params = "".join(f", K{i}" for i in range(n_consts))
    code = compile(
        f"def make(tr, names, handler, full, put_mem{params}):\n"
        "    regs, mem, lines, reads, writes = tr.regs, tr.mem, tr.lines, tr.reads, tr.writes\n"
        "    rkeys, mg = regs.keys(), mem.get\n"
        "    def hot():\n"
        "        for events in (reads, writes):\n"
        "            for a, k in events:\n"
        f"                if a >> {LINE_SHIFT} in lines or (a + k - 1) >> {LINE_SHIFT} in lines:\n"
        "                    return True\n"
        "        return False\n"
        + "\n".join(_indent(source.splitlines(), 1)) + "\n    return step\n",
        "<taint step>",
        "exec",
    )
    env = {"span": span, "fit": fit, "shift_labels": shift_labels}
    exec(code, env)  # our own generated source: constants and names from the decoder only
    return env["make"]  # type: ignore[no-any-return]


def _indent(lines: list[str], level: int) -> list[str]:
    return ["    " * level + x for x in lines]


# -- source of operand access --------------------------------------------------------------------
def _get(var: str, op: Operand, index: int = 0) -> list[str] | None:
    """Source that sets ``var`` to the operand's labels, None when it holds no taint at all (a
    memory operand with no read event reads as clean, as in the generic handlers)."""
    if _named(op):
        return [f"t = regs.get({op.reg!r})",
                f"{var} = None if t is None else t[{op.off}:{op.off + op.width}]"]
    if op.kind == X86_OP_MEM:
        lookup = [f"{var} = list(map(mg, range(a, a + k)))",
                  f"if {var}.count(None) == k:", f"    {var} = None"]
        if op.size == 1:  # a byte operand: one lookup
            lookup = ["if k == 1:", "    x = mg(a)", f"    {var} = None if x is None else [x]",
                      "else:", *_indent(lookup, 1)]
        return [
            f"{var} = None",
            f"if len(reads) > {index}:",
            f"    a, k = reads[{index}]",
            f"    if k < {op.size}:",  # split in two (a 16-byte access is two of 8): no call
            f"        if len(reads) > {index + 1} and reads[{index + 1}][0] == a + k"
            f" and k + reads[{index + 1}][1] >= {op.size}:",
            f"            k += reads[{index + 1}][1]",
            "        else:",
            f"            a, k = span(reads, {index}, {op.size})",
            # A line never tainted holds no label: skip the byte lookups.
            f"    if k > {LINE} or a >> {LINE_SHIFT} in lines"
            f" or (a + k - 1) >> {LINE_SHIFT} in lines:",
            *_indent(lookup, 2),
        ]
    if op.kind == X86_OP_IMM:
        return [f"{var} = None"]
    return None


def _first(out: str, labels: str) -> list[str]:
    return [f"{out} = None", f"for x in {labels}:", "    if x is not None:", f"        {out} = x",
            "        break"]


def _put(var: str | None, op: Operand, vex: bool, side_effect_only: bool = False) -> list[str]:
    """Source that writes ``var`` (exactly the operand's width, a list no one else holds; None:
    clean) into the register with the architecture's side effects: a 32-bit write zeroes the
    upper half, a VEX-encoded 128-bit write the upper lane. ``side_effect_only``: the operand's
    bytes already hold ``var``; only the side effect is written."""
    canon, off, width = op.reg, op.off, op.width
    size = full_size(canon)
    end = off + width
    zero = []
    if size == 8 and width == 4 and off == 0:
        zero = ["cur[4:8] = [None] * 4"]
    elif vex and size == 32 and width == 16:
        zero = ["cur[16:32] = [None] * 16"]
    cleared = [
        f"cur = regs.get({canon!r})",
        "if cur is not None:",
        f"    cur[{off}:{end}] = [None] * {width}",
        *_indent(zero, 1),
        f"    if cur.count(None) == {size}:",
        f"        del regs[{canon!r}]",
    ]
    if side_effect_only:
        if not zero:
            return []
        return [f"cur = regs.get({canon!r})", "if cur is not None:", *_indent(zero, 1),
                f"    if cur.count(None) == {size}:", f"        del regs[{canon!r}]"]
    if off == 0 and width == size:
        cleared = [f"regs.pop({canon!r}, None)"]
        tainted = [f"regs[{canon!r}] = {var}"]
    else:
        tainted = [
            f"cur = regs.get({canon!r})",
            "if cur is None:",
            f"    cur = regs[{canon!r}] = [None] * {size}",
            f"cur[{off}:{end}] = {var}",
            *zero,
        ]
    if var is None:
        return cleared
    return [f"if {var} is None or {var}.count(None) == {width}:", *_indent(cleared, 1),
            "else:", *_indent(tainted, 1)]


def _mem_setter(tr: TaintTracker, size: int) -> Callable[[Labels | None], None]:
    """Writes labels into the memory the operand wrote (its first write events): padded or cut
    to what was written; None: clean."""
    writes, lines, mem = tr.writes, tr.lines, tr.mem

    def put(labels: Labels | None) -> None:
        if not writes:
            return
        a, n = writes[0]
        if n < size:
            a, n = span(writes, 0, size)  # type: ignore[misc]
        if labels is None or labels.count(None) == len(labels):
            if mem and not (n <= LINE and a >> LINE_SHIFT not in lines
                            and (a + n - 1) >> LINE_SHIFT not in lines):
                pop = mem.pop
                for x in range(a, a + n):
                    pop(x, None)
            return
        tr._set_mem(a, fit(labels, n))

    return put


# -- source of handlers --------------------------------------------------------------------------
def _body(insn: Insn) -> list[str] | None:
    ops, kind = insn.ops, insn.kind
    if kind == d.MOV and len(ops) == 2 and insn.mnemonic != "movbe":
        return _mov(insn)
    if kind == d.MOVX and len(ops) == 2 and _named(ops[0]):
        return _movx(insn)
    if kind == d.ALU and len(ops) == 2 and _named(ops[0]):
        return _alu(insn)
    if kind == d.CMP and len(ops) == 2 and not (ops[0].kind == ops[1].kind == X86_OP_MEM):
        return _cmp(insn)
    if kind == d.UNARY and ops and _named(ops[0]):
        return _unary(insn)
    if kind in (d.SMEAR, d.GENERIC) and not insn.touches_mem and insn.writes:
        return _smear(insn)
    if kind == d.JCC:  # on tainted flags: only a run that records conditions has work to do
        return ["if tr.max_conditions > len(tr.conditions):", "    handler(next_address)"]
    return None


def _mov(insn: Insn) -> list[str] | None:
    dst, src = insn.ops
    get = _get("s", src)
    if get is None:
        return None
    if dst.kind == X86_OP_MEM and dst.size == 1:  # a byte store (strcpy's loop): inline
        return [*get, "if writes:", "    a, k = writes[0]", "    if k != 1:", "        put_mem(s)",
                "    elif s is None or s[0] is None:", "        mem.pop(a, None)", "    else:",
                "        mem[a] = s[0]", f"        lines.add(a >> {LINE_SHIFT})"]
    if dst.kind == X86_OP_MEM:
        return [*get, "put_mem(s)"]  # the setter fits the labels to what was written
    if not _named(dst):
        return None
    if _named(src) and src.width == dst.width:
        return [*get, *_put("s", dst, insn.vex)]
    return [*get, f"if s is not None and len(s) != {dst.width}:", f"    s = fit(s, {dst.width})",
            *_put("s", dst, insn.vex)]


def _movx(insn: Insn) -> list[str] | None:
    dst, src = insn.ops
    get = _get("s", src)
    if get is None:
        return None
    fill = "s[-1]" if insn.mnemonic.startswith("movs") else "None"
    extend = f"(s + [{fill}] * {dst.size})[:{dst.size}]"
    if dst.size != dst.width:
        extend = f"fit({extend}, {dst.width})"
    return [*get, "if s is not None:", f"    s = {extend}", *_put("s", dst, False)]


def _alu(insn: Insn) -> list[str] | None:
    dst, src = insn.ops
    if (insn.mnemonic in d._ZERO_IDIOM and src.kind == X86_OP_REG and src.reg == dst.reg
            and src.off == dst.off):
        return [*_put(None, dst, insn.vex), "tr.flags = None", "tr.last_cmp = None"]
    get_s = _get("s", src)
    if get_s is None:
        return None
    w = dst.width
    flags = ["f = None", "if acc is not None:", *_indent(_first("f", "acc")[1:], 1),
             "tr.flags = f", "tr.last_cmp = None"]
    # A clean source, or a fully tainted destination, leaves the destination's labels as they
    # are: only the write's side effect on the rest of the register remains.
    kept = [*flags, *_put("acc", dst, insn.vex, side_effect_only=True), "return"]
    if _named(src) and src.width == w:
        take = "s"
        merge = ["acc = [a if a is not None else b for a, b in zip(acc, s, strict=True)]"]
    else:
        take = f"fit(s, {w})"
        merge = [f"k = min({w}, len(s))",
                 "acc = [a if a is not None else b for a, b in zip(acc[:k], s[:k],"
                 " strict=True)] + acc[k:]"]
    return [*(_get("acc", dst) or []), *get_s,
            "if s is None or (acc is not None and None not in acc):", *_indent(kept, 1),
            f"if acc is None or acc.count(None) == {w}:", f"    acc = {take}",
            "else:", *_indent(merge, 1),
            *flags, *_put("acc", dst, insn.vex)]


def _cmp(insn: Insn) -> list[str] | None:
    left, right = insn.ops
    get_l, get_r = _get("s", left), _get("s", right)
    if get_l is None or get_r is None:
        return None
    scan = ["f = None", "if s is not None:", *_indent(_first("f", "s")[1:], 1)]
    return [
        *get_l, *scan,
        "if f is None:", *_indent([*get_r, *scan[1:]], 1),
        # Recording a condition needs the compared values too: the full handler does it.
        "if f is not None and tr.max_conditions > len(tr.conditions):",
        "    return full(next_address)",
        "tr.flags = f",
        "tr.last_cmp = None",
    ]


def _reorder(m: str, n: int, count: int) -> str | None:
    """Source of the labels ``L`` after a shift or rotate by ``count`` bits (``shift_labels``
    written out for whole-byte counts)."""
    q, r = divmod(count, 8)
    if r:
        return f"L = shift_labels(L, {m!r}, {count})"
    return {
        "shl": f"L = [None] * {q} + L[:{n - q}]",
        "sal": f"L = [None] * {q} + L[:{n - q}]",
        "shr": f"L = L[{q}:] + [None] * {q}",
        "sar": f"L = L[{q}:] + [L[-1]] * {q}",
        "rol": f"L = L[{n - q}:] + L[:{n - q}]",
        "ror": f"L = L[{q}:] + L[:{q}]",
    }.get(m)


def _unary(insn: Insn) -> list[str] | None:
    ops, m = insn.ops, insn.mnemonic
    dst = ops[0]
    if len(ops) == 1 and m in _KEEP_BYTES:
        reorder: list[str] = []
    elif len(ops) == 1 and m == "bswap":
        reorder = ["L = L[::-1]"]
    elif len(ops) == 2 and m in SHIFTS and ops[1].kind == X86_OP_IMM:
        line = _reorder(m, dst.width, ops[1].imm % (8 * dst.width or 1))
        if line is None:
            return None
        reorder = [line]
    else:
        return None
    return [*(_get("L", dst) or []), "f = None", "if L is not None:", *_indent(reorder, 1),
            *_indent(_first("f", "L")[1:], 1), "tr.flags = f", "tr.last_cmp = None",
            *_put("L", dst, insn.vex)]


def _smear(insn: Insn) -> list[str]:
    """Bit scans, mask extractions, shuffles between registers: every written byte may hold any
    byte read (the generic rule), with the registers looked up once."""
    lines = [
        "if reads or writes:",  # memory after all (an implicit access): the generic rule
        "    return handler(next_address)",
        "f = None",
    ]
    for i, (c, o, w) in enumerate(insn.reads):
        scan = [f"t = regs.get({c!r})", "if t is not None:",
                *_indent(_first("f", f"t[{o}:{o + w}]")[1:], 1)]
        lines += _indent(scan, 1) if i else scan
        if i:
            lines.insert(len(lines) - len(scan), "if f is None:")
    for c, o, w in insn.writes:
        lines += [f"L = None if f is None else [f] * {w}",
                  *_put("L", Operand(X86_OP_REG, w, c, o, w), insn.vex)]
    return [*lines, "tr.flags = f", "tr.last_cmp = None"]
