"""Per-address step functions for the taint engine: every decoded instruction gets one closure,
built once, with its operands' registers, byte slices, sizes and the fast-path test folded in.

An HTTP replay spent ~8 us of Python per tainted instruction in generic handlers that looked
at each operand's kind at run time (a dozen calls and list copies for ``pcmpeqb xmm1, xmm0``).
The shapes that dominate real services (register/memory moves, zero and sign extension,
two-operand ALU and compares, shifts by a constant, bit scans and mask extractions) get
handlers specialised here; every other instruction runs the engine's generic handler. Both
give the same labels: the specialised ones are the generic ones with the dispatch done once.

Contract with the engine: a step function takes the next instruction's address; ``regs``
holds only lists no one else references (they are updated in place), ``mem``/``lines`` and the
memory event lists are the tracker's own objects for its whole life (cleared, never replaced).
"""

from __future__ import annotations

from collections.abc import Callable
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
    its specialised handler or ``generic``."""
    handler = _specialised(tr, insn) or generic
    rkeys = tr.regs.keys()
    names = insn.regnames
    lines, reads, writes = tr.lines, tr.reads, tr.writes
    reads_flags = insn.kind in _FLAG_READERS
    sets_flags = insn.kind in _FLAG_SETTERS

    def hot() -> bool:
        for events in (reads, writes):
            for a, n in events:
                if a >> LINE_SHIFT in lines or (a + n - 1) >> LINE_SHIFT in lines:
                    return True
        return False

    def step(next_address: int) -> None:
        if (
            rkeys.isdisjoint(names)
            and (not reads_flags or tr.flags is None)
            and not (lines and (reads or writes) and hot())
        ):
            if sets_flags:
                tr.flags = None
                tr.last_cmp = None
            return
        tr.tainted_count += 1
        handler(next_address)

    return step


# -- operand access ------------------------------------------------------------------------------
def _reg_getter(tr: TaintTracker, op: Operand) -> Callable[[], Labels | None]:
    """The operand's labels, or None when its register holds no taint at all."""
    regs, canon, lo, hi = tr.regs, op.reg, op.off, op.off + op.width

    def get() -> Labels | None:
        t = regs.get(canon)
        return None if t is None else t[lo:hi]

    return get


def _mem_getter(tr: TaintTracker, size: int, index: int) -> Callable[[], Labels | None]:
    """The labels of the memory the operand read (event ``index`` on), None when no line it
    touched ever held taint; an operand with no read event reads as ``size`` clean bytes."""
    reads, lines, mem = tr.reads, tr.lines, tr.mem

    def get() -> Labels | None:
        if len(reads) <= index:
            return None
        a, n = reads[index]
        if n < size:
            a, n = span(reads, index, size)  # type: ignore[misc]
        if n <= LINE and a >> LINE_SHIFT not in lines and (a + n - 1) >> LINE_SHIFT not in lines:
            return None
        g = mem.get
        return [g(x) for x in range(a, a + n)]

    return get


def _reg_setter(tr: TaintTracker, op: Operand, vex: bool) -> Callable[[Labels | None], None]:
    """Writes labels (exactly the operand's width, a list no one else holds; None: clean) into
    the register with the architecture's side effects: a 32-bit write zeroes the upper half, a
    VEX-encoded 128-bit write the upper lane."""
    regs, canon, off, width = tr.regs, op.reg, op.off, op.width
    size = full_size(canon)
    end = off + width
    whole = off == 0 and width == size
    zero_hi = size == 8 and width == 4 and off == 0
    zero_lane = vex and size == 32 and width == 16
    blank = [None] * width

    def put(labels: Labels | None) -> None:
        cur = regs.get(canon)
        clean = labels is None or labels.count(None) == width
        if cur is None:
            if clean:
                return
            if whole:
                regs[canon] = labels  # type: ignore[assignment]
                return
            cur = [None] * size
            cur[off:end] = labels  # type: ignore[assignment]
            regs[canon] = cur
            return
        cur[off:end] = blank if clean else labels  # type: ignore[assignment]
        if zero_hi:
            cur[4:8] = blank
        elif zero_lane:
            cur[16:32] = blank
        if cur.count(None) == size:
            del regs[canon]

    return put


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


def _getter(tr: TaintTracker, op: Operand, index: int = 0) -> Callable[[], Labels | None] | None:
    if _named(op):
        return _reg_getter(tr, op)
    if op.kind == X86_OP_MEM:
        return _mem_getter(tr, op.size, index)
    if op.kind == X86_OP_IMM:
        return lambda: None
    return None


def _setter(tr: TaintTracker, op: Operand, vex: bool) -> Callable[[Labels | None], None] | None:
    if _named(op):
        return _reg_setter(tr, op, vex)
    if op.kind == X86_OP_MEM:
        return _mem_setter(tr, op.size)
    return None


# -- handlers ------------------------------------------------------------------------------------
def _specialised(tr: TaintTracker, insn: Insn) -> Step | None:
    ops, kind = insn.ops, insn.kind
    if kind == d.MOV and len(ops) == 2 and insn.mnemonic != "movbe":
        return _mov(tr, insn)
    if kind == d.MOVX and len(ops) == 2 and _named(ops[0]):
        return _movx(tr, insn)
    if kind == d.ALU and len(ops) == 2 and _named(ops[0]):
        return _alu(tr, insn)
    if kind == d.CMP and len(ops) == 2 and not (ops[0].kind == ops[1].kind == X86_OP_MEM):
        return _cmp(tr, insn)
    if kind == d.UNARY and ops and _named(ops[0]):
        return _unary(tr, insn)
    if kind in (d.SMEAR, d.GENERIC) and not insn.touches_mem and insn.writes:
        return _smear(tr, insn)
    return None


def _mov(tr: TaintTracker, insn: Insn) -> Step | None:
    dst, src = insn.ops
    get, put = _getter(tr, src), _setter(tr, dst, insn.vex)
    if get is None or put is None:
        return None
    if dst.kind == X86_OP_MEM:
        def mov_to_mem(_n: int) -> None:
            put(get())  # the setter fits the labels to what was written
        return mov_to_mem
    width = dst.width

    def mov(_n: int) -> None:
        labels = get()
        put(None if labels is None else fit(labels, width))

    return mov


def _movx(tr: TaintTracker, insn: Insn) -> Step | None:
    dst, src = insn.ops
    get = _getter(tr, src)
    if get is None:
        return None
    put = _reg_setter(tr, dst, False)
    signed = insn.mnemonic.startswith("movs")
    size, width = dst.size, dst.width

    def movx(_n: int) -> None:
        labels = get()
        if labels is None:
            return put(None)
        fill = labels[-1] if signed else None
        put(fit(fit(labels + [fill] * size, size), width))

    return movx


def _alu(tr: TaintTracker, insn: Insn) -> Step | None:
    dst, src = insn.ops
    put = _reg_setter(tr, dst, insn.vex)
    if (insn.mnemonic in d._ZERO_IDIOM and src.kind == X86_OP_REG and src.reg == dst.reg
            and src.off == dst.off):
        def zero(_n: int) -> None:
            put(None)
            tr.flags = None
            tr.last_cmp = None
        return zero
    get_d = _reg_getter(tr, dst)
    get_s = _getter(tr, src)
    if get_s is None:
        return None
    width = dst.width

    def alu(_n: int) -> None:
        acc = get_d()
        s = get_s()
        if s is not None:
            if acc is None:
                acc = fit(s, width)
            else:
                k = min(width, len(s))
                acc = [a if a is not None else b for a, b in zip(acc[:k], s[:k],
                                                                 strict=True)] + acc[k:]
        if acc is None:
            tr.flags = None
            tr.last_cmp = None
            return put(None)
        tr.flags = first(acc)
        tr.last_cmp = None
        put(acc)

    return alu


def _cmp(tr: TaintTracker, insn: Insn) -> Step | None:
    left, right = insn.ops
    get_l, get_r = _getter(tr, left), _getter(tr, right)
    if get_l is None or get_r is None:
        return None
    full = tr.cmp_handler(insn)  # builds the condition's operands when they are recorded

    def cmp(n: int) -> None:
        f = None
        labels = get_l()
        if labels is not None:
            f = first(labels)
        if f is None:
            labels = get_r()
            if labels is not None:
                f = first(labels)
        if f is not None and tr.max_conditions > len(tr.conditions):
            return full(n)
        tr.flags = f
        tr.last_cmp = None

    return cmp


def _unary(tr: TaintTracker, insn: Insn) -> Step | None:
    ops, m = insn.ops, insn.mnemonic
    dst = ops[0]
    if len(ops) == 1 and m in _KEEP_BYTES:
        reorder = None
    elif len(ops) == 1 and m == "bswap":
        def reorder(labels: Labels) -> Labels:
            return labels[::-1]
    elif len(ops) == 2 and m in SHIFTS and ops[1].kind == X86_OP_IMM:
        count = ops[1].imm % (8 * dst.width or 1)

        def reorder(labels: Labels) -> Labels:
            return shift_labels(labels, m, count)
    else:
        return None
    get, put = _reg_getter(tr, dst), _reg_setter(tr, dst, insn.vex)

    def unary(_n: int) -> None:
        labels = get()
        if labels is None:
            tr.flags = None
            tr.last_cmp = None
            return put(None)
        if reorder is not None:
            labels = reorder(labels)
        tr.flags = first(labels)
        tr.last_cmp = None
        put(labels)

    return unary


def _smear(tr: TaintTracker, insn: Insn) -> Step | None:
    """Bit scans, mask extractions, shuffles between registers: every written byte may hold any
    byte read (the generic rule), with the registers looked up once."""
    regs, reads, writes = tr.regs, tr.reads, tr.writes
    sources = [(c, o, o + w) for c, o, w in insn.reads]
    targets = [(_reg_setter(tr, Operand(X86_OP_REG, w, c, o, w), insn.vex), w)
               for c, o, w in insn.writes]
    generic = tr.generic_handler(insn)

    def smear(n: int) -> None:
        if reads or writes:  # memory after all (an implicit access): the generic rule
            return generic(n)
        f = None
        for c, lo, hi in sources:
            t = regs.get(c)
            if t is not None:
                f = first(t[lo:hi])
                if f is not None:
                    break
        for put, w in targets:
            put(None if f is None else [f] * w)
        tr.flags = f
        tr.last_cmp = None

    return smear
