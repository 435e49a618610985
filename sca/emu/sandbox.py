"""The sandbox: a service image in bare unicorn, flash-cloned per run.

A sandbox boots the service once until it blocks on its first receive, saves the emulator's
context with memory (copy-on-write) together with the emulated kernel's state, and restores both
for every run. Nothing of the service ever runs natively. Every run has budgets: instructions,
memory (the brk and mmap arenas are mapped before the snapshot, because mapping after a memory
snapshot and restoring aborts unicorn) and wall time.
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_CONTEXT_CPU,
    UC_CTL_CONTEXT_MEMORY,
    UC_CTL_CONTEXT_MODE,
    UC_CTL_IO_WRITE,
    UC_ERR_OK,
    UC_HOOK_INSN,
    UC_HOOK_MEM_FETCH_PROT,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

from sca.alert import Message

from .elf import PAGE, Executable, page_down, page_up, parse_executable
from .image import ServiceImage, load_image
from .kernel import Blocked, Exited, Io, Kernel, KernelState, SyscallRecord, TrapHit

STACK_TOP = 0x7FFF_F000_0000
STACK_SIZE = 1 << 20
MMAP_BASE = 0x7F00_0000_0000
BRK_GAP = 0x10_0000  # a guard gap after the image, so a heap overflow faults instead of wrapping
# emu_start's stop address: a non-canonical one no jump can reach (0 would make a call to NULL
# end the run quietly instead of faulting).
NEVER = 0xDEAD_0000_0000_0000
ARENA_QUIET = 256 * 1024
_SYSCALL_ARGS = (
    UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX,
    UC_X86_REG_R10, UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_RIP,
)


class _RegBatch:
    """A fixed set of 64-bit registers read in one C call into arrays made once (the
    binding's ``reg_read_batch`` builds them in Python on every call: ~50 µs, at every
    syscall of every run)."""

    def __init__(self, regs: tuple[int, ...]) -> None:
        n = self.count = len(regs)
        self.ids = (ctypes.c_int * n)(*regs)
        self.vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))

    def read(self, uc: Uc) -> tuple[int, ...]:
        status = uc._do_reg_read_batch(self.ids, self.ptrs, self.count)  # type: ignore[attr-defined]
        if status != UC_ERR_OK:
            raise UcError(status)
        return tuple(self.vals)


class SandboxError(RuntimeError):
    """The service cannot be brought up in the sandbox (never a hostile-input condition)."""


@dataclass(frozen=True, slots=True)
class Budget:
    instructions: int = 20_000_000
    memory: int = 64 << 20  # bytes for brk and mmap together
    wall_ms: int = 3000


class Outcome(StrEnum):
    BLOCKED = "blocked"  # the service waits for input the run does not have: a normal end
    EXITED = "exited"
    FAULT = "fault"  # the service crashed (bad fetch, read or write, invalid instruction)
    BUDGET = "budget"  # instruction or wall-time budget spent
    TRAP = "trap"  # a verifier trap was reached
    STOPPED = "stopped"  # a monitor stopped the run (e.g. the taint engine caught an exploit)


@dataclass
class RunResult:
    outcome: Outcome
    io: Io
    fault: str = ""
    fetch_address: int | None = None  # where a fetch from unmapped memory went
    exit_status: int | None = None
    elapsed_s: float = 0.0
    stop_reason: object = None

    @property
    def sent(self) -> list[tuple[int | None, bytes]]:
        return self.io.sent

    @property
    def records(self) -> list[SyscallRecord]:
        return self.io.records

    def execves(self) -> list[tuple[bytes, tuple[bytes, ...]]]:
        return [r.args for r in self.io.records if r.name == "execve"]  # type: ignore[misc]


class StopRun(Exception):
    """Raised from a hook to stop a run; ``reason`` lands in RunResult.stop_reason."""

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Layout:
    brk_base: int
    brk_limit: int
    mmap_base: int
    mmap_limit: int
    regions: list[tuple[int, int]] = field(default_factory=list)  # mapped [start, end)


class Sandbox:
    """One emulator per service, reused for every run (creating many is slow)."""

    def __init__(self, image: ServiceImage, budget: Budget | None = None) -> None:
        self._syscall_args = _RegBatch(_SYSCALL_ARGS)
        self.image = image
        self.budget = budget or Budget()
        self.exe: Executable = parse_executable(image.binary)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.layout = self._map_memory()
        self.kernel = Kernel(self.uc, KernelState())
        self.deadline = 0.0
        self._fetch_address: int | None = None
        self.uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
        self.uc.hook_add(
            UC_HOOK_MEM_FETCH_UNMAPPED | UC_HOOK_MEM_FETCH_PROT, self._on_bad_fetch
        )
        self.uc.hook_add(
            UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_WRITE_PROT,
            self._on_bad_access,
        )
        # First writes to arena pages after a restore are slow in unicorn (a loop touching a
        # 32 MiB heap page by page ran ~100 s on 5M instructions), and such a loop makes no
        # syscall where the deadline is checked: check it on arena writes too (C filters the
        # ranges, so other writes cost nothing). The image's own data, mapped as runs of pages,
        # does not have the problem.
        # Past the first ARENA_QUIET bytes only: a normal service's heap stays in them and pays
        # no callback per write; a loop that touches the whole arena is caught.
        for lo, hi in [(self.layout.brk_base, self.layout.brk_limit),
                       (self.layout.mmap_base, self.layout.mmap_limit)]:
            self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_arena_write, None,
                             min(lo + ARENA_QUIET, hi - 1), hi - 1)
        self._arena_writes = 0
        self._boot()

    # -- set-up ---------------------------------------------------------------------------------
    def _map_memory(self) -> _Layout:
        uc = self.uc
        pages: dict[int, int] = {}
        for seg in self.exe.segments:
            for p in range(page_down(seg.vaddr), page_up(seg.vaddr + seg.memsz), PAGE):
                pages[p] = pages.get(p, 0) | seg.perms
        # One mapping per run of pages with the same permissions: a page each made boot slow
        # and copy-on-write after a restore slower with every region (a big .bss).
        regions: list[tuple[int, int, int]] = []
        for p in sorted(pages):
            if regions and regions[-1][1] == p and regions[-1][2] == pages[p]:
                regions[-1] = (regions[-1][0], p + PAGE, pages[p])
            else:
                regions.append((p, p + PAGE, pages[p]))
        for lo, hi, perms in regions:
            uc.mem_map(lo, hi - lo, perms | UC_PROT_READ)
        for seg in self.exe.segments:
            uc.mem_write(seg.vaddr, seg.data)
        # Arenas: half the memory budget each for brk and mmap, mapped now (see module doc).
        half = page_up(self.budget.memory // 2)
        brk_base = page_up(self.exe.end) + BRK_GAP
        uc.mem_map(brk_base, half, UC_PROT_READ | UC_PROT_WRITE)
        uc.mem_map(MMAP_BASE, half, UC_PROT_READ | UC_PROT_WRITE)
        # The stack is executable, as on the old systems the sample worms attacked.
        uc.mem_map(STACK_TOP - STACK_SIZE, STACK_SIZE, UC_PROT_ALL)
        spans = [(lo, hi) for lo, hi, _ in regions] + [
            (brk_base, brk_base + half),
            (MMAP_BASE, MMAP_BASE + half),
            (STACK_TOP - STACK_SIZE, STACK_TOP),
        ]
        return _Layout(brk_base, brk_base + half, MMAP_BASE, MMAP_BASE + half, spans)

    def is_mapped(self, addr: int) -> bool:
        return any(lo <= addr < hi for lo, hi in self.layout.regions)

    def _build_stack(self) -> int:
        """argv, an empty environment and the auxiliary vector glibc's static start-up reads."""
        uc = self.uc
        sp = STACK_TOP - 0x1000
        strings = bytearray()

        def put(data: bytes) -> int:
            nonlocal strings
            addr = sp + len(strings)
            strings += data
            return addr

        argv0 = put(f"/srv/{self.image.name}\0".encode())
        platform = put(b"x86_64\0")
        rand = put(bytes(range(16)))
        uc.mem_write(sp, bytes(strings))
        e = self.exe
        auxv = [
            (3, e.phdr_addr), (4, e.phent), (5, e.phnum), (6, PAGE), (7, 0), (8, 0), (9, e.entry),
            (11, 1000), (12, 1000), (13, 1000), (14, 1000), (16, 0), (17, 100), (23, 0),
            (25, rand), (31, argv0), (15, platform), (0, 0),
        ]
        words = [1, argv0, 0, 0]  # argc, argv[0], NULL, envp NULL
        for k, v in auxv:
            words += [k, v]
        frame = struct.pack(f"<{len(words)}Q", *words)
        rsp = (sp - len(frame) - 0x100) & ~0xF
        uc.mem_write(rsp, frame)
        return rsp

    def _boot(self) -> None:
        st = self.kernel.state
        st.brk = st.brk_base = self.layout.brk_base
        st.brk_limit = self.layout.brk_limit
        st.mmap_next = self.layout.mmap_base
        st.mmap_limit = self.layout.mmap_limit
        self.uc.reg_write(UC_X86_REG_RSP, self._build_stack())
        result = self._execute(self.exe.entry, 50_000_000, 30_000)
        if result.outcome != Outcome.BLOCKED:
            detail = result.fault or result.outcome.value
            raise SandboxError(
                f"{self.image.name}: the service did not reach its first receive ({detail}); "
                f"syscalls: {[r.name for r in result.records][-8:]}"
            )
        self.uc.ctl(
            UC_CTL_CONTEXT_MODE,
            UC_CTL_IO_WRITE,
            ctypes.c_int(UC_CTL_CONTEXT_CPU | UC_CTL_CONTEXT_MEMORY),
        )
        self._snapshot = self.uc.context_save()
        self._snapshot_state = self.kernel.state.clone()
        self.boot_io = result.io

    # -- hooks ----------------------------------------------------------------------------------
    def _on_syscall(self, uc: Uc, _user: object) -> None:
        nr, a0, a1, a2, a3, a4, a5, rip = self._syscall_args.read(uc)
        if time.perf_counter() > self.deadline:
            uc.reg_write(UC_X86_REG_RIP, rip - 2)
            raise StopRun(Outcome.BUDGET)
        try:
            ret = self.kernel.syscall(nr, (a0, a1, a2, a3, a4, a5))
        except Blocked:
            # Stay on the syscall so a later run resumes by re-issuing it.
            uc.reg_write(UC_X86_REG_RIP, rip - 2)
            raise
        uc.reg_write(UC_X86_REG_RAX, ret & 0xFFFF_FFFF_FFFF_FFFF)

    def _on_arena_write(self, uc: Uc, *_: object) -> None:
        self._arena_writes += 1
        if not self._arena_writes & 0x3F and time.perf_counter() > self.deadline:
            raise StopRun(Outcome.BUDGET)

    def add_raw_hook(self, htype: int, fptr: ctypes._CFuncPtr) -> int:
        """Register a ctypes callback directly (no binding wrapper): for hot hooks. The callback
        must catch its own exceptions and pass them to ``hook_failed``."""
        handle = self.uc._Uc__do_hook_add(htype, fptr, 1, 0)  # type: ignore[attr-defined]
        self.uc.ctl_flush_tb()  # blocks translated before the hook would run unhooked
        return int(handle)

    def hook_failed(self, exc: BaseException) -> None:
        """Stop the run and have ``emu_start`` raise ``exc``, as the binding does for its own
        hooks."""
        if self.uc._hook_exception is None:  # type: ignore[attr-defined]
            self.uc._hook_exception = exc  # type: ignore[attr-defined]
        self.uc.emu_stop()

    def _on_bad_fetch(self, uc: Uc, _access: int, address: int, *_: object) -> bool:
        self._fetch_address = address
        return False

    def _on_bad_access(self, uc: Uc, access: int, address: int, size: int, *_: object) -> bool:
        return False

    # -- runs -----------------------------------------------------------------------------------
    def _execute(self, begin: int, count: int, wall_ms: int) -> RunResult:
        io = self.kernel.io
        self._fetch_address = None
        start = time.perf_counter()
        self.deadline = start + wall_ms / 1000
        outcome, fault, status, reason = Outcome.BUDGET, "", None, None
        try:
            # No unicorn timeout: it starts a timer thread per call (~0.5 ms). The instruction
            # count bounds pure computation; the deadline is checked at every syscall.
            self.uc.emu_start(begin, NEVER, count=count)
        except Blocked:
            outcome = Outcome.BLOCKED
        except Exited as e:
            outcome, status = Outcome.EXITED, e.status
        except TrapHit:
            outcome = Outcome.TRAP
        except StopRun as e:
            outcome, reason = (e.reason, None) if isinstance(e.reason, Outcome) else (
                Outcome.STOPPED, e.reason)
        except UcError as e:
            outcome, fault = Outcome.FAULT, str(e)
        return RunResult(
            outcome=outcome,
            io=io,
            fault=fault,
            fetch_address=self._fetch_address,
            exit_status=status,
            elapsed_s=time.perf_counter() - start,
            stop_reason=reason,
        )

    def restore(self) -> None:
        """Back to the snapshot: the service waiting on its first receive."""
        self.uc.context_restore(self._snapshot)
        self.kernel.state = self._snapshot_state.clone()
        self.kernel.io = Io()
        self.kernel.trap_number = self.kernel.trap_hit = None

    def run(
        self,
        messages: Iterable[Message],
        *,
        budget: Budget | None = None,
        prepare: Callable[[Kernel], None] | None = None,
    ) -> RunResult:
        """Replay ``messages`` in a fresh clone; ``prepare`` may set kernel hooks or traps."""
        b = budget or self.budget
        self.restore()
        self.kernel.io.messages = tuple(messages)
        if prepare is not None:
            prepare(self.kernel)
        rip = self.uc.reg_read(UC_X86_REG_RIP)
        return self._execute(rip, b.instructions, b.wall_ms)


def open_sandbox(manifest: str | Path, budget: Budget | None = None) -> Sandbox:
    return Sandbox(load_image(manifest), budget)
