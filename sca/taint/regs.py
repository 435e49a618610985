"""Register naming for the shadow state: every capstone register name maps to a canonical full
register and the byte slice it covers (al -> rax[0:1], ah -> rax[1:2], xmm3 -> vec3[0:16])."""

from __future__ import annotations

GPR_BYTES = 8
VEC_BYTES = 32


def _build() -> dict[str, tuple[str, int, int]]:
    table: dict[str, tuple[str, int, int]] = {}
    legacy = {"a": "rax", "b": "rbx", "c": "rcx", "d": "rdx"}
    for k, full in legacy.items():
        table[full] = (full, 0, 8)
        table[f"e{k}x"] = (full, 0, 4)
        table[f"{k}x"] = (full, 0, 2)
        table[f"{k}l"] = (full, 0, 1)
        table[f"{k}h"] = (full, 1, 1)
    for base in ("si", "di", "bp", "sp"):
        full = "r" + base
        table[full] = (full, 0, 8)
        table["e" + base] = (full, 0, 4)
        table[base] = (full, 0, 2)
        table[base + "l"] = (full, 0, 1)
    for n in range(8, 16):
        full = f"r{n}"
        table[full] = (full, 0, 8)
        table[f"r{n}d"] = (full, 0, 4)
        table[f"r{n}w"] = (full, 0, 2)
        table[f"r{n}b"] = (full, 0, 1)
    for n in range(16):
        table[f"xmm{n}"] = (f"vec{n}", 0, 16)
        table[f"ymm{n}"] = (f"vec{n}", 0, 32)
    return table


REGS = _build()
# Registers the shadow state ignores: addresses and control, never data an exploit copies.
IGNORED = frozenset({"rip", "rflags", "eflags", "flags", "fs", "gs", "cs", "ds", "es", "ss"})


def full_size(canon: str) -> int:
    return VEC_BYTES if canon.startswith("vec") else GPR_BYTES
