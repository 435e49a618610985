"""Instruction decoding for taint propagation: capstone decodes each address once and we keep a
small record of what the instruction does to the shadow state (its kind and operands)."""

from __future__ import annotations

from dataclasses import dataclass, field

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_IMM, X86_OP_MEM, X86_OP_REG

from .regs import IGNORED, REGS

# Kinds of shadow-state effect.
MOV, MOVX, ALU, CMP, UNARY, SMEAR, PUSH, POP, RET, BRANCH, JCC, SETCC, CMOV = range(13)
LEA, XCHG, MOVS, STOS, LODS, SCAS, CLEAR, NOP, GENERIC, CALLDIRECT = range(13, 23)

_MOV = {
    "mov", "movabs", "movd", "movq", "movdqa", "movdqu", "movaps", "movups", "movapd", "movupd",
    "lddqu", "movnti", "movntdq", "movntps", "movbe", "movlpd", "movlps", "movhpd", "movhps",
    "vmovdqu", "vmovdqa", "vmovdqu8", "vmovdqu64", "vmovdqa64", "vmovups", "vmovaps", "vmovd",
    "vmovq", "vmovntdq", "vlddqu",
}
_MOVX = {"movzx", "movsx", "movsxd", "cdqe", "cwde", "cbw"}
_ALU = {
    "add", "sub", "and", "or", "xor", "adc", "sbb", "imul", "andn",
    "pand", "pandn", "por", "pxor", "paddb", "paddw", "paddd", "paddq", "psubb", "psubw",
    "psubd", "psubq", "pminub", "pmaxub", "pminud", "pcmpeqb", "pcmpeqw", "pcmpeqd", "pcmpgtb",
    "andps", "andnps", "orps", "xorps", "andpd", "orpd", "xorpd", "pavgb", "psadbw",
    "vpand", "vpandn", "vpor", "vpxor", "vpminub", "vpmaxub", "vpcmpeqb", "vpcmpeqd",
    "vpsubb", "vpaddb", "vpminud", "vpternlogd", "vpcmpb", "vpcmpub", "vpcmpneqb",
    "vptestnmb", "vptestmb", "vpxorq", "vporq", "vpandq",
}
_ZERO_IDIOM = {"xor", "sub", "pxor", "xorps", "xorpd", "vpxor", "vxorps", "vpxorq", "psubb", "sbb"}
_CMP = {"cmp", "test", "ptest", "vptest", "bt", "comiss", "ucomiss", "comisd", "ucomisd"}
_UNARY = {
    "inc", "dec", "neg", "not", "shl", "shr", "sar", "sal", "rol", "ror", "rcl", "rcr", "shld",
    "shrd", "psllw", "pslld", "psllq", "psrlw", "psrld", "psrlq", "psraw", "psrad", "bswap",
    "sarx", "shlx", "shrx",
}
_SMEAR = {
    "pshufb", "pshufd", "pshuflw", "pshufhw", "punpcklbw", "punpckhbw", "punpcklwd", "punpckhwd",
    "punpckldq", "punpckhdq", "punpcklqdq", "punpckhqdq", "palignr", "pslldq", "psrldq",
    "pmovmskb", "movmskps", "movmskpd", "pcmpistri", "pcmpistrm", "pcmpestri", "pcmpestrm",
    "vpbroadcastb", "vpbroadcastd", "vpbroadcastq", "vpshufb", "vpmovmskb", "vpalignr",
    "vpcmpistri", "bsf", "bsr", "tzcnt", "lzcnt", "popcnt", "pextrb", "pextrw", "pextrd",
    "pextrq", "pinsrb", "pinsrw", "pinsrd", "pinsrq", "kmovd", "kmovq", "vpminub", "pmovzxbw",
    "vpmovzxbw", "vinserti128", "vextracti128", "vperm2i128", "vpermq", "shufps", "unpcklps",
    "vzeroupper", "kortestd", "kortestq", "vpmovb2m", "vpmovm2b",
}
_CLEAR = {"cpuid", "rdtsc", "rdtscp", "xgetbv", "syscall", "rdrand", "rdpid"}
_NOP = {"nop", "endbr64", "hlt", "pause", "lfence", "mfence", "sfence", "prefetcht0",
        "prefetcht1", "prefetcht2", "prefetchnta", "prefetchw", "cld", "std", "clc", "stc",
        "leave", "ud2", "int3", "fnstcw", "fldcw", "stmxcsr", "ldmxcsr", "fwait", "wait"}


@dataclass(frozen=True, slots=True)
class Operand:
    kind: int  # X86_OP_REG / X86_OP_MEM / X86_OP_IMM
    size: int
    reg: str = ""  # canonical register for REG
    off: int = 0
    width: int = 0
    imm: int = 0
    base: str = ""  # canonical base register of a memory operand (for stack pointer tests)


@dataclass(slots=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    kind: int
    ops: tuple[Operand, ...]
    touches_mem: bool
    reads: tuple[tuple[str, int, int], ...] = ()  # every register read: (canon, off, width)
    writes: tuple[tuple[str, int, int], ...] = ()  # every register written
    target: int | None = None  # immediate branch target
    vex: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    regnames: frozenset[str] = frozenset()  # every register it reads or writes, canonical


def _canon(name: str) -> tuple[str, int, int] | None:
    if name in IGNORED:
        return None
    return REGS.get(name)


class Decoder:
    def __init__(self) -> None:
        self.cs = Cs(CS_ARCH_X86, CS_MODE_64)
        self.cs.detail = True

    def decode(self, code: bytes, address: int) -> Insn | None:
        for i in self.cs.disasm(code, address, 1):
            return self._describe(i)
        return None

    def _describe(self, i) -> Insn:  # type: ignore[no-untyped-def]
        m = i.mnemonic
        prefix = ""
        if m.startswith(("rep ", "repe ", "repne ", "lock ", "bnd ", "notrack ")):
            prefix, _, m = m.partition(" ")
        ops = []
        touches_mem = False
        for o in i.operands:
            if o.type == X86_OP_REG:
                c = _canon(i.reg_name(o.reg))
                if c is None:
                    ops.append(Operand(X86_OP_REG, o.size))
                else:
                    ops.append(Operand(X86_OP_REG, o.size, c[0], c[1], c[2]))
            elif o.type == X86_OP_MEM:
                touches_mem = True
                base = _canon(i.reg_name(o.mem.base)) if o.mem.base else None
                ops.append(Operand(X86_OP_MEM, o.size, base=base[0] if base else ""))
            elif o.type == X86_OP_IMM:
                ops.append(Operand(X86_OP_IMM, o.size, imm=o.imm))
        r, w = i.regs_access()
        reads = tuple(c for c in (_canon(i.reg_name(x)) for x in r) if c is not None)
        writes = tuple(c for c in (_canon(i.reg_name(x)) for x in w) if c is not None)
        kind = self._kind(m, i, ops)
        if kind in (PUSH, POP, RET, MOVS, STOS, LODS, SCAS, CALLDIRECT, XCHG) or m == "call":
            touches_mem = True
        target = ops[0].imm if ops and ops[0].kind == X86_OP_IMM and kind in (JCC, BRANCH,
                                                                           CALLDIRECT) else None
        names = frozenset([r[0] for r in reads + writes] + [o.reg for o in ops if o.reg])
        insn = Insn(i.address, i.size, m, kind, tuple(ops), touches_mem, reads, writes, target,
                    vex=m.startswith("v"), regnames=names)
        if prefix:
            insn.extra["prefix"] = prefix
        return insn

    @staticmethod
    def _kind(m: str, i, ops: list[Operand]) -> int:  # type: ignore[no-untyped-def]
        if m in _MOV:
            return MOV
        if m in _MOVX:
            return MOVX
        if m in _CMP or (m.startswith("cmps") and len(ops) == 2 and ops[0].kind != X86_OP_MEM):
            return CMP
        if m in _ALU:
            return ALU
        if m in _UNARY:
            return UNARY
        if m in _SMEAR:
            return SMEAR
        if m == "push":
            return PUSH
        if m == "pop":
            return POP
        if m == "ret":
            return RET
        if m in ("call", "jmp"):
            if ops and ops[0].kind == X86_OP_IMM:
                return CALLDIRECT if m == "call" else NOP
            return BRANCH
        if m.startswith("j"):
            return JCC
        if m.startswith("set"):
            return SETCC
        if m.startswith("cmov"):
            return CMOV
        if m == "lea":
            return LEA
        if m in ("xchg", "xadd", "cmpxchg"):
            return XCHG if m == "xchg" else GENERIC
        if m.startswith("movs") and ops[0].kind != X86_OP_REG:
            return MOVS
        if m.startswith("stos"):
            return STOS
        if m.startswith("lods"):
            return LODS
        if m.startswith(("scas", "cmps")):
            return SCAS
        if m in _CLEAR:
            return CLEAR
        if m in _NOP:
            return NOP
        return GENERIC
