"""Byte-level dynamic taint tracking on the sandbox (Vigilante's dynamic dataflow analysis).

Every byte the service receives carries a label (message index, offset). Labels follow the data
through the instructions the service executes: capstone decodes each address once into a record
(``sca.taint.decode``) that becomes the address's step function (``sca.taint.steps``: the
fast-path test and, for the common shapes, the handler generated with its operands folded in;
the generic handlers below for the rest), a code hook runs the steps and the memory hooks give
the exact addresses read and written. An instruction's effect is applied when the next one
starts, by which time its memory accesses are known.

Detection:
- execution-control: a ret, or an indirect jmp/call, whose target comes from tainted bytes (a
  tainted conditional branch is not an exploit; only its condition is recorded);
- code-execution: an instruction fetched from tainted bytes (checked for a few instructions after
  a tainted control transfer too, so a return into a trampoline that jumps into the attacker's
  bytes is reported as the stronger code-execution alert);
- function-argument: tainted bytes in execve's path (argument 0) or argv strings (argument 1).
  execve is the critical call watched: it is what turns request bytes into a program run.

Along the way every conditional branch that depends on tainted flags is recorded as a condition
over message bytes (the compared bytes, the other operand's value, the direction taken): the
filter generator builds on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, Uc, x86_const
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, HOOK_MEM_ACCESS_CFUNC
from unicorn.x86_const import UC_X86_REG_RIP

from sca.alert import (
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
    Verification,
)
from sca.emu.kernel import Kernel
from sca.emu.sandbox import Budget, Outcome, RunResult, Sandbox, StopRun

from . import decode as d
from . import steps
from .decode import Decoder, Insn, Operand
from .regs import REGS, full_size
from .steps import (
    LINE_SHIFT,
    SHIFTS,
    X86_OP_IMM,
    X86_OP_MEM,
    X86_OP_REG,
    first,
    shift_labels,
    span,
)

MAX_INSN = 15  # bytes in the longest x86 instruction
INTERRUPTED = "interrupted"  # a run's stop_reason when ``interrupted()`` said so
HIJACK_WINDOW = 8  # instructions to watch after a tainted transfer for a fetch from tainted bytes
MAX_CONDITIONS = 4096

Label = int | None


def make_label(msg: int, off: int) -> int:
    return (msg << 16) | off


def to_ref(label: int) -> ByteRef:
    return ByteRef(label >> 16, label & 0xFFFF)


_REFS: dict[Label, ByteRef | None] = {None: None}


def _refs(labels: list[Label]) -> tuple[ByteRef | None, ...]:
    """``to_ref`` of each label (None stays None), from a cache: recorded conditions name the
    same compared bytes again and again, and refs are immutable, so sharing them is safe."""
    try:
        return tuple(map(_REFS.__getitem__, labels))
    except KeyError:
        if len(_REFS) > 1 << 16:
            _REFS.clear()
            _REFS[None] = None
        for x in labels:
            if x not in _REFS:
                _REFS[x] = to_ref(x)  # type: ignore[arg-type]
        return tuple(map(_REFS.__getitem__, labels))


@dataclass(frozen=True, slots=True)
class Condition:
    """A branch that depended on message bytes: ``op`` compared ``left`` (message bytes, None
    where clean) with ``right`` (message bytes or a constant) and the branch went ``taken``."""

    pc: int
    jcc: str
    op: str
    left: tuple[ByteRef | None, ...]
    right: tuple[ByteRef | None, ...] | int | None
    taken: bool


@dataclass
class Detection:
    verification: Verification
    pc: int
    detail: str
    # Where the attacker's bytes sat in service memory when they took effect: the slot a
    # hijacked target was read from, or execve's argument string (filter generation uses it).
    site: int | None = None


@dataclass
class TaintRun:
    result: RunResult
    detection: Detection | None
    conditions: list[Condition] = field(default_factory=list)
    instructions: int = 0
    tainted_instructions: int = 0
    memory: dict[int, int] = field(default_factory=dict)  # address -> label, at the end

    def labels_at(self, addr: int, n: int) -> list[ByteRef | None]:
        return [to_ref(x) if (x := self.memory.get(a)) is not None else None
                for a in range(addr, addr + n)]


class TaintTracker:
    """A sandbox with taint hooks attached once; ``run`` replays messages with taint."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sb = sandbox
        self.uc: Uc = sandbox.uc
        self.decoder = Decoder()
        self.cache: dict[int, steps.Step] = {}  # address -> its step (``sca.taint.steps``)
        # The shadow state: one set of objects for the tracker's life (the steps hold them).
        self.mem: dict[int, int] = {}
        self.lines: set[int] = set()  # memory lines (64 bytes) that have held taint this run
        self.regs: dict[str, list[Label]] = {}
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        # Polled every 512 instructions; True ends the run with stop_reason INTERRUPTED.
        self.interrupted: Callable[[], bool] | None = None
        self._reset()
        # Raw ctypes hooks: the binding's wrappers add two Python frames to each of the
        # ~1.4 callbacks per instruction.
        on_code, on_read, on_write = self._hooks()
        sandbox.add_raw_hook(UC_HOOK_CODE, HOOK_CODE_CFUNC(on_code))
        sandbox.add_raw_hook(UC_HOOK_MEM_READ, HOOK_MEM_ACCESS_CFUNC(on_read))
        sandbox.add_raw_hook(UC_HOOK_MEM_WRITE, HOOK_MEM_ACCESS_CFUNC(on_write))
        # Blocks translated before the hooks existed would run unhooked.
        self.uc.ctl_flush_tb()

    def _reset(self) -> None:
        self.mem.clear()
        self.lines.clear()
        self.regs.clear()
        self.reads.clear()
        self.writes.clear()
        self.flags: Label = None
        self.last_cmp: tuple[str, list[Label], list[Label] | int | None] | None = None
        self.cur: steps.Step | None = None  # the step of the instruction running now
        self.hijack: tuple[ExecutionControl, int, int] | None = None
        self.site: int | None = None
        self.conditions: list[Condition] = []
        self.max_conditions = MAX_CONDITIONS
        self.count = 0
        self.tainted_count = 0

    # -- kernel callbacks -------------------------------------------------------------------------
    def _input(self, addr: int, msg: int, off: int, n: int) -> None:
        mem = self.mem
        for i in range(n):
            mem[addr + i] = (msg << 16) | (off + i)
        self.lines.update(range(addr >> LINE_SHIFT, ((addr + n - 1) >> LINE_SHIFT) + 1))

    def _kernel_write(self, addr: int, n: int) -> None:
        mem = self.mem
        if not mem:
            return
        if n > len(mem):  # a big mapping: look through the few tainted bytes, not every address
            for a in [a for a in mem if addr <= a < addr + n]:
                del mem[a]
            return
        pop = mem.pop
        for a in range(addr, addr + n):
            pop(a, None)

    def _execve(self, path: int, argv: list[int]) -> None:
        for arg, addrs in ((0, [path]), (1, argv)):
            for a in addrs:
                labels = self._string_labels(a)
                tainted = [to_ref(x) for x in labels if x is not None]
                if tainted:
                    v = FunctionArgument("execve", arg, tuple(tainted))
                    raise StopRun(Detection(v, 0, f"tainted execve argument {arg}", a))

    def _string_labels(self, addr: int) -> list[Label]:
        s = self.sb.kernel.cstring(addr)
        return [self.mem.get(addr + i) for i in range(len(s))]

    def _prepare(self, kernel: Kernel) -> None:
        kernel.on_input = self._input
        kernel.on_write = self._kernel_write
        kernel.on_execve = self._execve

    # -- hooks ----------------------------------------------------------------------------------
    def _hooks(self) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
        """The code, memory-read and memory-write hooks: closures over the tracker's containers
        (attribute lookups were a fifth of the per-instruction overhead)."""
        cache, mem, reads, writes = self.cache, self.mem, self.reads, self.writes
        append_read, append_write = reads.append, writes.append

        def on_read(_h: int, _access: int, address: int, size: int, _v: int, _u: object) -> None:
            append_read((address, size))

        def on_write(_h: int, _access: int, address: int, size: int, _v: int, _u: object) -> None:
            append_write((address, size))

        def on_code(_h: int, address: int, size: int, _u: object) -> None:
            try:
                step = self.cur
                if step is not None:
                    step(address)  # a step never stops the run: ``cur`` may stay set meanwhile
                count = self.count = self.count + 1
                if not count & 0x1FF:  # every ~3 ms of hooked code
                    self.cur = None
                    self._checkpoint()
                if address in mem:
                    raise StopRun(Detection(CodeExecution(to_ref(mem[address])), address,
                                            "instruction fetched from tainted bytes", self.site))
                if self.hijack is not None:
                    v, pc, left = self.hijack
                    if left <= 0:
                        raise StopRun(Detection(v, pc, "tainted control transfer", self.site))
                    self.hijack = (v, pc, left - 1)
                step = cache.get(address)
                if step is None:
                    self.cur = None
                    if size > MAX_INSN:  # unicorn's 0xf1f1f1f1 for a fetch it cannot decode: a
                        return  # read of that size would allocate 4 GiB for nothing
                    insn = self.decoder.decode(bytes(self.uc.mem_read(address, size)), address)
                    if insn is None:
                        return
                    step = cache[address] = steps.build(self, insn, self.generic_handler(insn))
                self.cur = step
                if reads:
                    reads.clear()
                if writes:
                    writes.clear()
            except BaseException as e:  # handed to emu_start, which re-raises it
                self.cur = None
                self.sb.hook_failed(e)

        return on_code, on_read, on_write

    def _checkpoint(self) -> None:
        # Hooked code runs ~100x slower than bare: keep the wall-time budget here too, and
        # stop when whoever asked no longer wants the answer.
        if time.perf_counter() > self.sb.deadline:
            raise StopRun(Outcome.BUDGET)
        if self.interrupted is not None and self.interrupted():
            raise StopRun(INTERRUPTED)

    # -- shadow state helpers ---------------------------------------------------------------------
    def _mem_labels(self, addr: int, size: int) -> list[Label]:
        get = self.mem.get
        return [get(a) for a in range(addr, addr + size)]

    def _set_mem(self, addr: int, labels: list[Label]) -> None:
        mem = self.mem
        if labels.count(None) == len(labels):
            pop = mem.pop
            for a in range(addr, addr + len(labels)):
                pop(a, None)
            return
        for i, x in enumerate(labels):
            if x is None:
                mem.pop(addr + i, None)
            else:
                mem[addr + i] = x
        # Lines are only ever added during a run: an over-approximation keeps the fast path safe.
        self.lines.update(range(addr >> LINE_SHIFT, ((addr + len(labels) - 1) >> LINE_SHIFT) + 1))

    def _clear_writes(self) -> None:
        if self.mem:
            for a, n in self.writes:
                self._set_mem(a, [None] * n)

    def _reg_labels(self, op: Operand) -> list[Label]:
        t = self.regs.get(op.reg)
        if t is None:
            return [None] * op.width
        return t[op.off:op.off + op.width]

    def _op_labels(self, op: Operand, read_index: int = 0) -> list[Label]:
        if op.kind == X86_OP_REG:
            return self._reg_labels(op) if op.reg else [None] * op.size
        if op.kind == X86_OP_MEM:
            got = span(self.reads, read_index, op.size)
            if got is not None:
                a, n = got
                return self._mem_labels(a, n) if self.mem else [None] * n
            return [None] * op.size
        return [None] * op.size

    def _set_reg(self, canon: str, off: int, width: int, labels: list[Label], vex: bool) -> None:
        cur = self.regs.get(canon)
        if cur is None:
            if labels.count(None) == len(labels):
                return  # clean onto clean: the common case, keep it cheap
            cur = [None] * full_size(canon)
        else:
            cur = list(cur)
        size = len(cur)
        labels = (labels + [None] * width)[:width]
        cur[off:off + width] = labels
        if size == 8 and width == 4 and off == 0:
            cur[4:8] = [None] * 4  # 32-bit writes zero the upper half
        elif vex and size == 32 and width == 16:
            cur[16:32] = [None] * 16  # VEX-encoded writes zero the upper lane
        if cur.count(None) != size:
            self.regs[canon] = cur
        else:
            self.regs.pop(canon, None)

    def _set_op(self, op: Operand, labels: list[Label], vex: bool = False) -> None:
        if op.kind == X86_OP_REG:
            if op.reg:
                self._set_reg(op.reg, op.off, op.width, labels, vex)
        elif op.kind == X86_OP_MEM and self.writes:
            got = span(self.writes, 0, op.size)
            if got is not None:
                a, n = got
                self._set_mem(a, (labels + [None] * n)[:n])

    # -- propagation ----------------------------------------------------------------------------
    def generic_handler(self, insn: Insn) -> steps.Step:
        """The kind's handler for ``insn``, as a step body (the fallback of ``steps.build``)."""
        handler = _KIND_HANDLERS.get(insn.kind, TaintTracker._k_generic)
        ops = insn.ops
        return lambda next_address: handler(self, insn, ops, next_address)

    def cmp_handler(self, insn: Insn) -> steps.Step:
        """The compare handler for ``insn``: it also records the operands for a condition."""
        ops = insn.ops
        return lambda next_address: self._k_cmp(insn, ops, next_address)

    def _k_mov(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            return self._generic(insn)
        src = self._op_labels(ops[1])
        if insn.mnemonic == "movbe":
            src = src[::-1]
        self._set_op(ops[0], src, insn.vex)

    def _k_movx(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            return self._generic(insn)
        src = self._op_labels(ops[1])
        dst = ops[0]
        fill = src[-1] if insn.mnemonic.startswith("movs") else None
        self._set_op(dst, (src + [fill] * dst.size)[: dst.size])

    def _k_alu(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            return self._generic(insn)
        dst = ops[0]
        srcs = ops[1:]
        if (
            len(ops) == 2 and insn.mnemonic in d._ZERO_IDIOM and ops[1].kind == X86_OP_REG
            and ops[1].reg == dst.reg and ops[1].off == dst.off and dst.kind == X86_OP_REG
        ):
            self._set_op(dst, [None] * dst.size, insn.vex)
            self.flags = None
            self.last_cmp = None
            return
        # Two-operand forms read their destination; AVX three-operand forms do not.
        reads_dst = len(ops) == 2 or not insn.vex
        acc = self._op_labels(dst) if reads_dst else [None] * dst.size
        mem_i = 1 if dst.kind == X86_OP_MEM else 0
        for s in srcs:
            labels = self._op_labels(s, mem_i if s.kind == X86_OP_MEM else 0)
            acc = [a if a is not None else (labels[i] if i < len(labels) else None)
                   for i, a in enumerate(acc)]
        self.flags = first(acc)
        self.last_cmp = None
        self._set_op(dst, acc, insn.vex)

    def _k_cmp(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            self.flags = None
            return
        left = self._op_labels(ops[0])
        both_mem = ops[0].kind == X86_OP_MEM and ops[1].kind == X86_OP_MEM
        right_l = self._op_labels(ops[1], 1 if both_mem else 0)
        self.flags = first(left) if first(left) is not None else first(right_l)
        if self.flags is None:
            self.last_cmp = None
            return
        right: list[Label] | int | None
        if ops[1].kind == X86_OP_IMM:
            right = ops[1].imm
        elif first(right_l) is not None:
            right = right_l
        else:
            right = self._concrete(ops[1])
        self.last_cmp = (insn.mnemonic, left, right)

    def _concrete(self, op: Operand) -> int | None:
        if op.kind == X86_OP_REG and op.reg and not op.reg.startswith("vec"):
            reg_id = _UC_REGS.get(op.reg)
            if reg_id is None:
                return None
            v = self.uc.reg_read(reg_id)
            return (v >> (8 * op.off)) & ((1 << (8 * op.width)) - 1)
        if op.kind == X86_OP_MEM and self.reads:
            a, n = self.reads[-1]
            return int.from_bytes(self.uc.mem_read(a, n), "little")
        return None

    def _k_unary(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if not ops:
            return self._generic(insn)
        dst = ops[0]
        labels = self._op_labels(dst)
        m = insn.mnemonic
        if m in SHIFTS and len(ops) == 2 and ops[1].kind == X86_OP_IMM:
            labels = shift_labels(labels, m, ops[1].imm % (8 * len(labels) or 1))
        elif m not in ("inc", "dec", "neg", "not", "bswap"):
            # Shifts and rotates move bytes around: every byte may hold any of them.
            f = first(labels)
            for s in ops[1:]:
                f = f if f is not None else first(self._op_labels(s))
            labels = [f] * len(labels)
        elif insn.mnemonic == "bswap":
            labels = labels[::-1]
        self.flags = first(labels)
        self.last_cmp = None
        self._set_op(dst, labels, insn.vex)

    def _k_push(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        src = self._op_labels(ops[0]) if ops else []
        if self.writes:
            a, n = self.writes[-1]
            self._set_mem(a, (src + [None] * n)[:n])

    def _k_pop(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        labels = self._mem_labels(*self.reads[0]) if self.reads else [None] * 8
        if insn.mnemonic == "leave":
            self._set_reg("rbp", 0, 8, labels, False)
        elif ops:
            self._set_op(ops[0], labels)

    def _transfer(self, insn: Insn, labels: list[Label], site: int | None) -> None:
        # Only a target whose low bytes come from the message is a hijack the verifier can test.
        prefix = []
        for x in labels:
            if x is None:
                break
            prefix.append(to_ref(x))
        if prefix and self.hijack is None:
            self.hijack = (ExecutionControl(tuple(prefix)), insn.address, HIJACK_WINDOW)
            self.site = site

    def _k_ret(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if self.reads:
            self._transfer(insn, self._mem_labels(*self.reads[0]), self.reads[0][0])

    def _k_branch(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if ops:
            site = self.reads[0][0] if ops[0].kind == X86_OP_MEM and self.reads else None
            self._transfer(insn, self._op_labels(ops[0]), site)
        if insn.mnemonic == "call":
            self._clear_writes()

    def _k_calldirect(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        self._clear_writes()

    def _k_jcc(self, insn: Insn, ops: tuple[Operand, ...], next_address: int) -> None:
        if self.flags is None or len(self.conditions) >= self.max_conditions:
            return
        taken = insn.target is not None and next_address == insn.target
        if self.last_cmp is not None:
            op, left, right = self.last_cmp
        else:
            op, left, right = "flags", [self.flags], None
        rr: tuple[ByteRef | None, ...] | int | None = right  # type: ignore[assignment]
        if isinstance(right, list):
            rr = _refs(right)
        self.conditions.append(Condition(insn.address, insn.mnemonic, op, _refs(left), rr,
                                         taken))

    def _k_setcc(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if ops:
            self._set_op(ops[0], [self.flags])

    def _k_cmov(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            return self._generic(insn)
        dst, src = self._op_labels(ops[0]), self._op_labels(ops[1])
        self._set_op(ops[0], [a if a is not None else b for a, b in zip(dst, src, strict=False)])

    def _k_lea(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        # Address arithmetic is not data flow (no pointer tainting).
        if ops:
            self._set_op(ops[0], [None] * ops[0].size)

    def _k_xchg(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if len(ops) < 2:
            return self._generic(insn)
        a, b = self._op_labels(ops[0]), self._op_labels(ops[1])
        if ops[0].kind == X86_OP_MEM:
            self._set_op(ops[1], a)
            self._set_op(ops[0], b)
        else:
            self._set_op(ops[0], b)
            self._set_op(ops[1], a)

    def _k_movs(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        for (ra, rn), (wa, _wn) in zip(self.reads, self.writes, strict=False):
            self._set_mem(wa, self._mem_labels(ra, rn))

    def _k_stos(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        src = self.regs.get("rax")
        for a, n in self.writes:
            self._set_mem(a, list(src[:n]) if src else [None] * n)

    def _k_lods(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if self.reads:
            a, n = self.reads[-1]
            self._set_reg("rax", 0, n, self._mem_labels(a, n), False)

    def _k_scas(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        f = first(self.regs.get("rax", ()))
        for a, n in self.reads:
            f = f if f is not None else first(self._mem_labels(a, n))
        self.flags = f
        self.last_cmp = None

    def _k_clear(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        for w in insn.writes:
            self._set_reg(w[0], 0, full_size(w[0]), [], False)

    def _k_nop(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        if insn.mnemonic == "leave":
            self._k_pop(insn, ops, _n)
        else:
            self._clear_writes()

    def _k_generic(self, insn: Insn, ops: tuple[Operand, ...], _n: int) -> None:
        self._generic(insn)

    def _generic(self, insn: Insn) -> None:
        """Shuffles, masks, bit scans and anything without its own handler: everything written
        may hold anything that was read (conservative; exact copies have their own handlers)."""
        f: Label = None
        for r in insn.reads:
            t = self.regs.get(r[0])
            if t is not None:
                f = first(t[r[1]:r[1] + r[2]])
                if f is not None:
                    break
        if f is None:
            for a, n in self.reads:
                f = first(self._mem_labels(a, n))
                if f is not None:
                    break
        for w in insn.writes:
            self._set_reg(w[0], w[1], w[2], [f] * w[2], insn.vex)
        for a, n in self.writes:
            self._set_mem(a, [f] * n)
        self.flags = f
        self.last_cmp = None

    # -- runs -----------------------------------------------------------------------------------
    def run(self, messages: Iterable[Message], budget: Budget | None = None, *,
            conditions: bool = True) -> TaintRun:
        """``conditions=False``: detection only, no branch conditions recorded (only filter
        generation reads them; they were ~6% of an HTTP replay)."""
        self._reset()
        if not conditions:
            self.max_conditions = 0
        result = self.sb.run(messages, budget=budget, prepare=self._prepare)
        if self.cur is not None and result.stop_reason is None:
            try:
                self.cur(self.uc.reg_read(UC_X86_REG_RIP))
            except StopRun as e:
                result.stop_reason = e.reason
        detection = result.stop_reason if isinstance(result.stop_reason, Detection) else None
        if detection is None and self.hijack is not None:
            # The hijacked transfer faulted (e.g. into unmapped memory) before the window ended.
            v, pc, _ = self.hijack
            detection = Detection(v, pc, "tainted control transfer", self.site)
        return TaintRun(result, detection, self.conditions, self.count, self.tainted_count,
                        dict(self.mem))


_UC_REGS = {  # canonical register -> unicorn's id, for a compare's concrete operand
    name: getattr(x86_const, f"UC_X86_REG_{name.upper()}")
    for name in {canon for canon, _, _ in REGS.values() if not canon.startswith("vec")}
}
_KIND_HANDLERS = {
    d.MOV: TaintTracker._k_mov, d.MOVX: TaintTracker._k_movx, d.ALU: TaintTracker._k_alu,
    d.CMP: TaintTracker._k_cmp, d.UNARY: TaintTracker._k_unary, d.SMEAR: TaintTracker._k_generic,
    d.PUSH: TaintTracker._k_push, d.POP: TaintTracker._k_pop, d.RET: TaintTracker._k_ret,
    d.BRANCH: TaintTracker._k_branch, d.CALLDIRECT: TaintTracker._k_calldirect,
    d.JCC: TaintTracker._k_jcc, d.SETCC: TaintTracker._k_setcc, d.CMOV: TaintTracker._k_cmov,
    d.LEA: TaintTracker._k_lea, d.XCHG: TaintTracker._k_xchg, d.MOVS: TaintTracker._k_movs,
    d.STOS: TaintTracker._k_stos, d.LODS: TaintTracker._k_lods, d.SCAS: TaintTracker._k_scas,
    d.CLEAR: TaintTracker._k_clear, d.NOP: TaintTracker._k_nop,
}
