"""The sample services: manifests, binaries, the exploit offsets (proved from the machine code),
the traffic generators, and, where the emulator is present, replies and hijacks inside it.

Nothing here runs a service natively: the binaries are read with pyelftools and capstone, and
executed only by ``sca.emu``.
"""

from __future__ import annotations

import random
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, CS_OP_IMM, CS_OP_MEM, CS_OP_REG, Cs
from elftools.elf.elffile import ELFFile

from sca.alert import (
    MAX_MESSAGES,
    MAX_TOTAL_BYTES,
    AlertType,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
)
from sca.emu.image import load_image
from sca.generate import Detector
from sca.services import (
    REQUIRED_KEYS,
    SAMPLES,
    binary_path,
    load_manifest,
    manifest_path,
    symbol_address,
    traffic,
)

REPO = Path(__file__).resolve().parents[2]
R_X86_64_IRELATIVE = 37
CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


# -- static analysis helpers ---------------------------------------------------------------------
def _reg64(name: str) -> str:
    """The 64-bit register a (sub)register name belongs to: 'r13d' -> 'r13', 'edi' -> 'rdi'."""
    if name.startswith("r") and name[1:2].isdigit():
        return name.rstrip("dwb")
    legacy = {"di": "rdi", "si": "rsi", "bp": "rbp", "sp": "rsp"}
    for short, full in legacy.items():
        if name in (short, "e" + short, short + "l"):
            return full
    for letter in "abcd":
        if name in (letter + "l", letter + "h", letter + "x", "e" + letter + "x"):
            return "r" + letter + "x"
    return name


@dataclass
class Call:
    address: int
    names: frozenset[str]
    rdi: int | None  # rdi as an offset from the function's rsp after its prologue, if known


@dataclass
class Frame:
    """What a function's prologue and its calls up to the first ``ret`` say about its stack."""

    pushes: int = 0
    sub: int = 0
    calls: list[Call] = field(default_factory=list)

    def rsp_to_ret(self) -> int:
        """Distance from the post-prologue rsp to the saved return address."""
        return self.sub + 8 * self.pushes


class Binary:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        with path.open("rb") as f:
            elf = ELFFile(f)
            self.header = dict(elf.header)
            self.segments = [dict(s.header) for s in elf.iter_segments()]
            self.sections = {
                s.name: (s["sh_addr"], s["sh_offset"], s["sh_size"], s["sh_type"])
                for s in elf.iter_sections()
            }
            self.by_name: dict[str, tuple[int, int]] = {}
            self.by_addr: dict[int, set[str]] = {}
            for sym in elf.get_section_by_name(".symtab").iter_symbols():
                if sym.name and sym["st_value"]:
                    self.by_name.setdefault(sym.name, (sym["st_value"], sym["st_size"]))
                    self.by_addr.setdefault(sym["st_value"], set()).add(sym.name)
            self.irelative: dict[int, int] = {}  # GOT slot -> ifunc resolver
            rela = elf.get_section_by_name(".rela.plt")
            if rela is not None:
                for r in rela.iter_relocations():
                    if r["r_info_type"] == R_X86_64_IRELATIVE:
                        self.irelative[r["r_offset"]] = r["r_addend"]
        self.md = Cs(CS_ARCH_X86, CS_MODE_64)
        self.md.detail = True

    def read(self, addr: int, size: int) -> bytes:
        for s_addr, s_off, s_size, s_type in self.sections.values():
            if s_type == "SHT_PROGBITS" and s_addr and s_addr <= addr < s_addr + s_size:
                start = s_off + (addr - s_addr)
                return self.data[start : start + min(size, s_addr + s_size - addr)]
        raise KeyError(f"{addr:#x} is in no section with file contents")

    def function(self, name: str) -> list:
        addr, size = self.by_name[name]
        return list(self.md.disasm(self.read(addr, size), addr))

    def call_names(self, target: int) -> frozenset[str]:
        """Names of what a call to ``target`` reaches, seeing through IRELATIVE PLT slots (how a
        static glibc binary calls its ifunc-selected string routines)."""
        if target in self.by_addr:
            return frozenset(self.by_addr[target])
        (insn,) = list(self.md.disasm(self.read(target, 16), target, count=1))
        if insn.mnemonic == "jmp" and insn.operands[0].type == CS_OP_MEM:
            mem = insn.operands[0].mem
            if insn.reg_name(mem.base) == "rip":
                slot = insn.address + insn.size + mem.disp
                resolver = self.irelative.get(slot)
                if resolver is not None:
                    return frozenset(self.by_addr.get(resolver, ()))
        return frozenset()

    def frame(self, name: str) -> Frame:
        """Walks ``name`` from its entry to its first ``ret``, tracking which registers hold
        rsp + constant, and records each call with what rdi points at."""
        fr = Frame()
        regs: dict[str, int] = {}
        prologue = True
        for insn in self.function(name):
            m, ops = insn.mnemonic, insn.operands
            if m == "ret":
                break
            if prologue and m == "push":
                fr.pushes += 1
                continue
            if m == "sub" and insn.reg_name(ops[0].reg) == "rsp" and ops[1].type == CS_OP_IMM:
                fr.sub, prologue = ops[1].imm, False
                continue
            if m == "call":
                target = ops[0].imm if ops[0].type == CS_OP_IMM else None
                names = self.call_names(target) if target is not None else frozenset()
                fr.calls.append(Call(insn.address, names, regs.get("rdi")))
                for r in CALLER_SAVED:
                    regs.pop(r, None)
                continue
            dst = _reg64(insn.reg_name(ops[0].reg)) if ops and ops[0].type == CS_OP_REG else None
            if m == "lea" and ops[1].type == CS_OP_MEM:
                mem = ops[1].mem
                if insn.reg_name(mem.base) == "rsp" and mem.index == 0 and dst:
                    regs[dst] = mem.disp
                    continue
            if m == "mov" and dst and ops[1].type == CS_OP_REG:
                src = _reg64(insn.reg_name(ops[1].reg))
                if src == "rsp":
                    regs[dst] = 0
                    continue
                if src in regs:
                    regs[dst] = regs[src]
                    continue
            _read, written = insn.regs_access()
            for r in written:
                regs.pop(_reg64(insn.reg_name(r)), None)
        return fr


@cache
def analysed(name: str) -> Binary:
    return Binary(binary_path(name))


def first_call(fr: Frame, callee: str) -> Call:
    for call in fr.calls:
        if callee in call.names:
            return call
    raise AssertionError(f"no call to {callee} in {[sorted(c.names) for c in fr.calls]}")


# -- manifests and binaries ----------------------------------------------------------------------
def test_samples_listed() -> None:
    assert SAMPLES == ("resolver", "httpd", "rpcd", "mgmtd")
    with pytest.raises(KeyError):
        manifest_path("../../etc")


@pytest.mark.parametrize("name", SAMPLES)
def test_manifest_has_exactly_the_required_keys(name: str) -> None:
    doc = tomllib.loads(manifest_path(name).read_text(encoding="utf-8"))
    assert set(REQUIRED_KEYS) <= set(doc)
    assert set(doc) - set(REQUIRED_KEYS) <= {"description", "warmup"}
    assert doc == load_manifest(name)
    assert doc["name"] == name
    assert doc["binary"] == f"bin/{name}"
    assert doc["proto"] in ("udp", "tcp")
    assert isinstance(doc["port"], int) and 1 <= doc["port"] <= 65535
    mod = traffic(name)
    assert (doc["proto"], doc["port"]) == (
        "udp" if name == "resolver" else "tcp",
        mod.PORT,
    )


@pytest.mark.parametrize("name", SAMPLES)
def test_binary_is_static_x86_64_elf(name: str) -> None:
    b = analysed(name)
    assert b.data[:4] == b"\x7fELF"
    assert b.header["e_ident"]["EI_CLASS"] == "ELFCLASS64"
    assert b.header["e_machine"] == "EM_X86_64"
    assert b.header["e_type"] == "ET_EXEC"  # -no-pie: fixed addresses
    kinds = {s["p_type"] for s in b.segments}
    assert "PT_INTERP" not in kinds and "PT_DYNAMIC" not in kinds
    assert ".dynamic" not in b.sections and ".interp" not in b.sections
    assert ".note.gnu.build-id" not in b.sections  # reproducible: no build id


def test_glibc_and_freestanding_mix() -> None:
    """resolver is freestanding (its own strcpy, no libc); the others link glibc, whose string
    routines are ifunc-selected (the vector versions run)."""
    assert "__libc_start_main" not in analysed("resolver").by_name
    assert analysed("resolver").irelative == {}
    for name in ("httpd", "rpcd", "mgmtd"):
        b = analysed(name)
        assert "__libc_start_main" in b.by_name
        assert b.irelative, f"{name} has no IRELATIVE (ifunc) slots"


# -- the exploit offsets, proved from the machine code -------------------------------------------
def test_resolver_name_to_return_address() -> None:
    t = traffic("resolver")
    fr = analysed("resolver").frame("lookup_instance")
    copy = fr.calls[0]
    assert "strcpy" in copy.names  # the first thing the handler does is the unbounded copy
    assert copy.rdi == 0  # mov %rsp,%rdi
    assert (fr.pushes, fr.sub) == (1, 0x40)
    assert fr.rsp_to_ret() - copy.rdi == t.NAME_TO_RET == 0x48
    # The service's own strcpy is the byte loop: load, store, test for NUL, loop.
    mnemonics = [i.mnemonic for i in analysed("resolver").function("strcpy")]
    assert mnemonics.count("movzx") == 1 and "test" in mnemonics and "jne" in mnemonics


def test_httpd_query_to_return_address() -> None:
    t = traffic("httpd")
    fr = analysed("httpd").frame("handle_request")
    copy = first_call(fr, "strcpy")
    assert copy is fr.calls[0]
    assert copy.rdi is not None
    assert (fr.pushes, fr.sub, copy.rdi) == (6, 0xA8, 0x20)
    assert fr.rsp_to_ret() - copy.rdi == t.QUERY_TO_RET == 0xB8
    assert t.QUERY_TO_RET >= t.PARAMS_SIZE


def test_rpcd_name_to_return_address_and_gadget() -> None:
    t = traffic("rpcd")
    b = analysed("rpcd")
    fr = b.frame("activate")
    copy = fr.calls[0]
    assert "memcpy" in copy.names
    assert copy.rdi is not None
    assert (fr.pushes, fr.sub, copy.rdi) == (5, 0x50, 0x10)
    assert fr.rsp_to_ret() - copy.rdi == t.NAME_TO_RET == 0x68
    gadget = b.function(t.GADGET_SYMBOL)[0]
    assert (gadget.mnemonic, gadget.op_str) == ("jmp", "rsp")
    assert gadget.address == t.gadget_address() == symbol_address("rpcd", "rpc_stack_thunk")


def test_mgmtd_tag_runs_into_execve_path() -> None:
    t = traffic("mgmtd")
    fr = analysed("mgmtd").frame("run")
    copies = [c for c in fr.calls if "strcpy" in c.names]
    execve = first_call(fr, "execve")
    assert len(copies) == 2
    path_copy, tag_copy = copies  # the path is filled in first, then the tag overruns it
    assert path_copy.address < tag_copy.address < execve.address
    assert execve.rdi == path_copy.rdi
    assert path_copy.rdi is not None and tag_copy.rdi is not None
    assert path_copy.rdi - tag_copy.rdi == t.TAG_TO_PATH == t.TAG_SIZE == 0x20
    # The return address is out of reach: the exploit only replaces the path.
    assert fr.rsp_to_ret() - tag_copy.rdi == t.TAG_TO_RET == 0x88
    assert t.TAG_TO_PATH + max(map(len, t.ATTACK_PATHS)) + 1 <= t.TAG_TO_PATH + t.PATH_SIZE


@pytest.mark.parametrize(("name", "symbol"), [("resolver", "sys_exit"), ("httpd", "_exit")])
def test_execution_control_targets_are_code(name: str, symbol: str) -> None:
    t = traffic(name)
    assert symbol == t.TARGET_SYMBOL
    addr = t.target_address()
    assert addr == symbol_address(name, symbol)
    assert any(
        s["p_type"] == "PT_LOAD"
        and s["p_flags"] & 1
        and s["p_vaddr"] <= addr < s["p_vaddr"] + s["p_memsz"]
        for s in analysed(name).segments
    )
    assert 0 not in addr.to_bytes(8, "little")[:3] and addr < 1 << 24


# -- traffic generators --------------------------------------------------------------------------
def _critical(case_messages: tuple[Message, ...], refs: tuple[ByteRef, ...]) -> bytes:
    return bytes(case_messages[r.message].data[r.offset] for r in refs)


def _refs(mod: ModuleType, case) -> tuple[ByteRef, ...]:  # type: ignore[no-untyped-def]
    v = case.verification
    if isinstance(v, CodeExecution):
        # The whole injected code, not just its first byte, so a chance byte cannot match.
        length = len(mod.HARNESS_CODE) + mod.CANONICAL_SLED
        return tuple(ByteRef(v.code.message, v.code.offset + i) for i in range(length))
    return v.target if isinstance(v, ExecutionControl) else v.bytes


@pytest.mark.parametrize("name", SAMPLES)
def test_generators_have_the_interface(name: str) -> None:
    mod = traffic(name)
    assert isinstance(mod.EXPECTED_TYPE, AlertType)
    assert mod.exploit_case().verification.type == mod.EXPECTED_TYPE
    msgs = mod.benign(random.Random(0))
    assert msgs and all(isinstance(m, Message) for m in msgs)
    udp = load_manifest(name)["proto"] == "udp"
    for m in [*msgs, *mod.exploit()]:
        assert (m.connection is None) == udp
        assert isinstance(m.data, bytes) and m.data


@pytest.mark.parametrize("name", SAMPLES)
def test_canonical_exploit_is_deterministic(name: str) -> None:
    mod = traffic(name)
    assert mod.exploit() == mod.exploit() == mod.exploit(None)
    assert mod.exploit_case() == mod.exploit_case()
    assert mod.benign(random.Random(5)) == mod.benign(random.Random(5))
    assert mod.exploit(random.Random(5)) == mod.exploit(random.Random(5))


@pytest.mark.parametrize("name", SAMPLES)
def test_variants_differ(name: str) -> None:
    mod = traffic(name)
    rng = random.Random(1234)
    variants = [tuple(mod.exploit(rng)) for _ in range(40)]
    assert len(set(variants)) == len(variants)
    assert tuple(mod.exploit()) not in variants


@pytest.mark.parametrize("name", SAMPLES)
def test_variants_keep_the_ground_truth(name: str) -> None:
    """Every variant's verification points at bytes that do what the class says, and the
    variant fits the alert's bounds."""
    mod = traffic(name)
    rng = random.Random(99)
    for case in [mod.exploit_case(), *(mod.exploit_case(rng) for _ in range(200))]:
        msgs = case.messages
        assert len(msgs) <= MAX_MESSAGES
        assert sum(len(m.data) for m in msgs) <= MAX_TOTAL_BYTES
        v = case.verification
        assert v.type == mod.EXPECTED_TYPE
        if isinstance(v, ExecutionControl):
            target = mod.target_address().to_bytes(8, "little")
            got = _critical(msgs, v.target)
            assert got == target[: len(got)]
            assert len(got) == mod.TARGET_BYTES + (name == "resolver")
        elif isinstance(v, CodeExecution):
            stream = b"".join(m.data for m in msgs)
            at = sum(len(m.data) for m in msgs[: v.code.message]) + v.code.offset
            gadget = mod.gadget_address().to_bytes(8, "little")
            assert stream[at - 8 : at] == gadget
            code = stream[at:]
            assert code.lstrip(mod.NOP).startswith(mod.HARNESS_CODE)
            assert code[0] == mod.NOP[0]
        else:
            assert isinstance(v, FunctionArgument)
            assert (v.call, v.argument) == ("execve", 0)
            assert _critical(msgs, v.bytes).decode() in mod.ATTACK_PATHS


@pytest.mark.parametrize("name", SAMPLES)
def test_benign_never_carries_the_exploit_bytes(name: str) -> None:
    mod = traffic(name)
    case = mod.exploit_case()
    refs = _refs(mod, case)
    critical = _critical(case.messages, refs)
    rng = random.Random(2024)
    for _ in range(500):
        session = mod.benign(rng)
        assert len(session) <= MAX_MESSAGES
        for m in session:
            window = bytes(m.data[r.offset] for r in refs if r.offset < len(m.data))
            assert window != critical
            assert critical not in m.data


def test_benign_variety() -> None:
    for name in SAMPLES:
        rng = random.Random(3)
        sessions = {tuple(traffic(name).benign(rng)) for _ in range(50)}
        assert len(sessions) > 30, name
    # TCP services see multi-connection sessions and requests split over several sends.
    rng = random.Random(4)
    httpd = [traffic("httpd").benign(rng) for _ in range(100)]
    assert any(max(m.connection or 0 for m in s) >= 1 for s in httpd)
    assert any(not s[0].data.endswith(b"\r\n\r\n") for s in httpd)


# -- inside the emulator -------------------------------------------------------------------------
@cache
def sandbox(name: str):  # type: ignore[no-untyped-def]
    emu = pytest.importorskip("sca.emu.sandbox")
    return emu.Sandbox(emu.load_image(manifest_path(name)))


@pytest.mark.parametrize("name", SAMPLES)
def test_benign_sessions_get_replies_in_the_emulator(name: str) -> None:
    sb = sandbox(name)
    mod = traffic(name)
    allowed = set(getattr(mod, "COMMANDS", {}).values())
    rng = random.Random(77)
    for _ in range(60):
        result = sb.run(mod.benign(rng))
        assert result.outcome.value == "blocked", (result.outcome, result.fault)
        assert result.sent, "every benign session gets at least one reply"
        for path, _argv in result.execves():
            assert path.decode() in allowed


def _hits(sb, begin: int, end: int, messages: list[Message]) -> tuple[object, list[int]]:  # type: ignore[no-untyped-def]
    """Runs ``messages`` and records each instruction fetched in [begin, end)."""
    from unicorn import UC_HOOK_CODE

    seen: list[int] = []
    handle = sb.uc.hook_add(
        UC_HOOK_CODE, lambda _uc, addr, _size, _u: seen.append(addr), None, begin, end - 1
    )
    # Blocks translated before the hook existed would run without it.
    sb.uc.ctl_flush_tb()
    try:
        result = sb.run(messages)
    finally:
        sb.uc.hook_del(handle)
    return result, seen


@pytest.mark.parametrize("name", ["resolver", "httpd"])
def test_execution_control_exploits_reach_the_target(name: str) -> None:
    sb = sandbox(name)
    mod = traffic(name)
    target = mod.target_address()
    rng = random.Random(8)
    for messages in [mod.exploit(), *(mod.exploit(rng) for _ in range(20))]:
        result, seen = _hits(sb, target, target + 1, messages)
        assert seen, "control never reached the target"
        assert result.outcome.value == "exited"
    for _ in range(20):
        _result, seen = _hits(sb, target, target + 1, mod.benign(rng))
        assert not seen


def test_rpcd_exploit_runs_the_injected_code() -> None:
    sb = sandbox("rpcd")
    mod = traffic("rpcd")
    from sca.emu.sandbox import STACK_SIZE, STACK_TOP

    stack_lo, stack_hi = STACK_TOP - STACK_SIZE, STACK_TOP
    rng = random.Random(9)
    for messages in [mod.exploit(), *(mod.exploit(rng) for _ in range(20))]:
        result, seen = _hits(sb, stack_lo, stack_hi, messages)
        assert seen, "no instruction was fetched from the stack"
        assert (result.outcome.value, result.exit_status) == ("exited", 0)
    _result, seen = _hits(sb, stack_lo, stack_hi, mod.benign(rng))
    assert not seen


def test_mgmtd_exploit_sets_the_execve_path() -> None:
    sb = sandbox("mgmtd")
    mod = traffic("mgmtd")
    rng = random.Random(10)
    for case in [mod.exploit_case(), *(mod.exploit_case(rng) for _ in range(20))]:
        result = sb.run(case.messages)
        assert result.outcome.value == "blocked"  # execve failed, the service went on
        path = _critical(case.messages, case.verification.bytes)
        assert path in [p for p, _argv in result.execves()]
        assert any(b"exec failed" in data for _conn, data in result.sent)


# -- reproducible build --------------------------------------------------------------------------
@pytest.mark.slow
def test_build_is_reproducible() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_services.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SAMPLES:
        assert f"ok      {name}" in proc.stdout


@pytest.mark.parametrize("name", SAMPLES)
def test_warmup_request_is_benign(name: str) -> None:
    """What a detector replays when it starts must never look like an exploit."""
    image = load_image(manifest_path(name))
    assert image.warmup
    connection = 0 if image.proto == "tcp" else None
    run = Detector(image).inspect((Message(image.warmup, connection),), conditions=False)
    assert run.detection is None and run.result.sent  # it was served, not refused
