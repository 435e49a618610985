"""Taint tracking (sca.taint): no detection on benign traffic, exact detection of every sample's
exploit and its variants, tainted branch conditions, and Triton as an oracle for byte labels.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from sca.alert import ByteRef, CodeExecution, ExecutionControl, FunctionArgument, Message
from sca.emu.elf import parse_executable, symbol_address
from sca.emu.image import ServiceImage
from sca.emu.sandbox import Outcome, Sandbox
from sca.generate import Detector
from sca.services import SAMPLES, traffic
from sca.services._traffic import ExploitCase
from sca.taint.engine import Condition, TaintTracker

N_CASES = 21  # the canonical exploit and 20 variants (see conftest)


def _byte(messages: tuple[Message, ...] | list[Message], ref: ByteRef) -> int:
    return messages[ref.message].data[ref.offset]


def _bytes(messages: tuple[Message, ...] | list[Message], refs: tuple[ByteRef, ...]) -> bytes:
    return bytes(_byte(messages, r) for r in refs)


def _refs_in_range(messages: tuple[Message, ...] | list[Message], refs: Any) -> bool:
    return all(
        0 <= r.message < len(messages) and 0 <= r.offset < len(messages[r.message].data)
        for r in refs
        if r is not None
    )


# -- benign traffic ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_benign_traffic_raises_no_detection(
    name: str, detectors: dict[str, Detector], benign: dict[str, list[list[Message]]]
) -> None:
    det = detectors[name]
    tainted_work = 0
    for messages in benign[name]:
        run = det.inspect(messages)
        assert run.detection is None, (messages, run.detection)
        assert run.result.outcome == Outcome.BLOCKED
        assert run.result.sent, "the tainted replay still answers"
        tainted_work += run.tainted_instructions
    assert tainted_work > 0, "benign input was never tracked at all"


@pytest.mark.parametrize("name", SAMPLES)
def test_taint_does_not_change_what_the_service_does(
    name: str,
    detectors: dict[str, Detector],
    sandboxes: dict[str, Sandbox],
    benign: dict[str, list[list[Message]]],
) -> None:
    for messages in benign[name][:10]:
        plain = sandboxes[name].run(messages)
        tainted = detectors[name].inspect(messages).result
        assert (tainted.outcome, tainted.sent) == (plain.outcome, plain.sent)


# -- exploits ----------------------------------------------------------------------------------
def _check_semantics(name: str, case: ExploitCase, v: Any) -> None:
    """What the referenced bytes must be, from what the exploit writes."""
    msgs = case.messages
    t = traffic(name)
    if name in ("resolver", "httpd"):
        assert isinstance(v, ExecutionControl)
        low = t.target_address().to_bytes(8, "little")
        got = _bytes(msgs, v.target)
        # The attacker's low bytes of the address, then (resolver) the copied NUL.
        assert got == low[: len(got)]
        assert len(got) == (4 if name == "resolver" else 3)
    elif name == "rpcd":
        assert isinstance(v, CodeExecution)
        stream = b"".join(m.data for m in msgs)
        gadget = t.gadget_address().to_bytes(8, "little")
        code_at = sum(len(m.data) for m in msgs[: v.code.message]) + v.code.offset
        assert stream[code_at - 8 : code_at] == gadget, "code starts right after the trampoline"
        assert _byte(msgs, v.code) == 0x90, "the first executed byte is the sled's first NOP"
        assert t.HARNESS_CODE in stream[code_at:]
    else:
        assert isinstance(v, FunctionArgument)
        assert (v.call, v.argument) == ("execve", 0)
        assert _bytes(msgs, v.bytes).decode() in t.ATTACK_PATHS


@pytest.mark.parametrize("name", SAMPLES)
def test_every_exploit_is_detected_at_the_right_bytes(
    name: str, detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    expected = traffic(name).EXPECTED_TYPE
    assert len(cases[name]) == N_CASES
    for i, case in enumerate(cases[name]):
        run = detectors[name].inspect(case.messages)
        assert run.detection is not None, f"case {i} not detected"
        v = run.detection.verification
        assert v.type == expected, f"case {i}"
        assert v == case.verification, f"case {i}: {v} != ground truth {case.verification}"
        _check_semantics(name, case, v)
        # Stopped at the detection, or ended by the hijacked code within the few instructions
        # watched after a tainted transfer (the canonical targets exit): never served on.
        assert run.result.outcome in (Outcome.STOPPED, Outcome.EXITED, Outcome.FAULT)


@pytest.mark.parametrize("name", SAMPLES)
def test_exploit_runs_record_tainted_conditions(
    name: str, detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    checked = 0
    for case in cases[name][:6]:
        run = detectors[name].inspect(case.messages)
        conds = run.conditions
        assert conds, "an exploit run parses attacker bytes: some branch depends on them"
        assert all(isinstance(c, Condition) for c in conds)
        for c in conds:
            assert any(r is not None for r in c.left) or isinstance(c.right, tuple)
            assert _refs_in_range(case.messages, c.left)
            if isinstance(c.right, tuple):
                assert _refs_in_range(case.messages, c.right)
        checked += _check_byte_compares(case.messages, conds)
    if name in ("resolver", "rpcd"):  # both switch on a single header byte
        assert checked > 0


@pytest.mark.parametrize("name", SAMPLES)
def test_detection_only_runs_find_the_same_exploit_without_conditions(
    name: str, detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    """The detect lane asks for no branch conditions (only filter generation reads them): the
    same detection, the same instructions, none recorded; the next full run records them."""
    for case in cases[name][:3]:
        full = detectors[name].inspect(case.messages)
        lean = detectors[name].inspect(case.messages, conditions=False)
        assert lean.detection is not None and full.detection is not None
        assert lean.detection.verification == full.detection.verification
        assert lean.instructions == full.instructions and lean.conditions == []
        assert detectors[name].inspect(case.messages).conditions == full.conditions


def _check_byte_compares(messages: tuple[Message, ...], conds: list[Condition]) -> int:
    """A one-byte ``cmp`` with a constant followed by je/jne: the branch direction recorded must
    agree with the message byte's value (the condition points at the byte really compared)."""
    checked = 0
    for c in conds:
        if c.op != "cmp" or c.jcc not in ("je", "jne") or not isinstance(c.right, int):
            continue
        if len(c.left) != 1 or c.left[0] is None:
            continue
        equal = _byte(messages, c.left[0]) == c.right & 0xFF
        assert equal == (c.taken if c.jcc == "je" else not c.taken), c
        checked += 1
    return checked


def test_resolver_conditions_include_the_type_byte_check(
    detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    """resolver switches on the type byte: the exploit's datagram has 0x04 there."""
    for case in cases["resolver"]:
        run = detectors["resolver"].inspect(case.messages)
        last = len(case.messages) - 1
        type_checks = [
            c
            for c in run.conditions
            if c.left == (ByteRef(last, 0),) and c.right == 0x04 and c.op == "cmp"
        ]
        assert type_checks, run.conditions[:5]
        assert all(c.taken == (c.jcc == "je") for c in type_checks)


def test_resolver_strcpy_checks_every_name_byte(
    detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    """The copy loop tests each copied byte for NUL: one condition per name byte, in order,
    up to the terminator."""
    case = cases["resolver"][0]
    run = detectors["resolver"].inspect(case.messages)
    nul_tests = [
        c.left[0].offset
        for c in run.conditions
        if c.op == "test" and len(c.left) == 1 and c.left[0] is not None
    ]
    name_end = case.messages[0].data.index(b"\0", 1)
    assert list(range(1, name_end)) == [o for o in nul_tests if 1 <= o < name_end][: name_end - 1]


def test_a_message_cut_in_chunks_keeps_exact_labels(
    detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    """The same httpd exploit bytes in one chunk and in many give the same stream positions."""
    case = cases["httpd"][0]
    data = case.messages[0].data
    chunks = tuple(Message(data[i : i + 7], 0) for i in range(0, len(data), 7))
    run = detectors["httpd"].inspect(chunks)
    assert run.detection is not None
    v = run.detection.verification
    assert isinstance(v, ExecutionControl) and isinstance(case.verification, ExecutionControl)
    positions = [7 * r.message + r.offset for r in v.target]
    assert positions == [r.offset for r in case.verification.target]


def test_tracker_counts_instructions(
    detectors: dict[str, Detector], cases: dict[str, list[ExploitCase]]
) -> None:
    run = detectors["resolver"].inspect(cases["resolver"][0].messages)
    assert 0 < run.tainted_instructions <= run.instructions
    # The name copy alone is ~0x48 iterations of a few tainted instructions each.
    assert run.tainted_instructions > 0x48


# -- Triton as an oracle -----------------------------------------------------------------------
REGS = ("rbx", "rbp", "r12", "r13", "r14", "r15")
OUT_BYTES = 24


class TritonView:
    """Runs the snippet service's straight-line code in Triton with every message byte a
    symbolic variable ``m<i>``, and tells, for a byte of a register or of memory, which message
    bytes it depends on and which one (if any) it is an exact copy of: found by perturbing the
    variables and evaluating the byte's expression (the AST's variable list over-reports)."""

    def __init__(self, image: ServiceImage, data: bytes) -> None:
        import triton

        self.t = triton
        self.binary = image.binary
        self.rng = random.Random(len(data))
        ctx = triton.TritonContext(triton.ARCH.X86_64)
        for seg in parse_executable(image.binary).segments:
            ctx.setConcreteMemoryAreaValue(seg.vaddr, seg.data)
        self.buf = self.sym("buf")
        ctx.setConcreteMemoryAreaValue(self.buf, data)
        ctx.setConcreteRegisterValue(ctx.registers.rsp, 0x7FFF_0000)
        ctx.setConcreteRegisterValue(ctx.registers.rax, len(data))  # recvfrom's result
        self.vars = [
            ctx.symbolizeMemory(triton.MemoryAccess(self.buf + i, 1), f"m{i}")
            for i in range(len(data))
        ]
        pc, end = self.sym("snippet_begin"), self.sym("snippet_end")
        ctx.setConcreteRegisterValue(ctx.registers.rip, pc)  # rip-relative operands need it
        steps = 0
        while pc != end:
            inst = triton.Instruction(pc, bytes(ctx.getConcreteMemoryAreaValue(pc, 16)))
            assert ctx.processing(inst) == triton.EXCEPTION.NO_FAULT
            pc = ctx.getConcreteRegisterValue(ctx.registers.rip)
            steps += 1
            assert steps < 1000
        self.ctx = ctx
        self.ast = ctx.getAstContext()

    def sym(self, name: str) -> int:
        addr = symbol_address(self.binary, name)
        assert addr is not None
        return addr

    def _byte_nodes(self, node: Any) -> list[Any]:
        return [
            self.ast.extract(8 * k + 7, 8 * k, node) for k in range(node.getBitvectorSize() // 8)
        ]

    def register(self, name: str) -> list[tuple[set[int], int | None, set[int]]]:
        node = self.ctx.getRegisterAst(getattr(self.ctx.registers, name))
        return [self._classify(b) for b in self._byte_nodes(node)]

    def memory(self, addr: int, n: int) -> list[tuple[set[int], int | None, set[int]]]:
        nodes = [self.ctx.getMemoryAst(self.t.MemoryAccess(addr + k, 1)) for k in range(n)]
        return [self._classify(b) for b in nodes]

    def variables(self, node: Any) -> set[int]:
        found = self.ast.search(self.ast.unroll(node), self.t.AST_NODE.VARIABLE)
        return {int(v.getSymbolicVariable().getAlias()[1:]) for v in found}

    def _classify(self, b: Any) -> tuple[set[int], int | None, set[int]]:
        ctx, vs = self.ctx, self.vars
        candidates = sorted(self.variables(b))
        saved = {i: ctx.getConcreteVariableValue(vs[i]) for i in candidates}
        probes = (0x00, 0x5A, 0x80, 0xFF)
        deps: set[int] = set()
        copies = dict.fromkeys(candidates, 0)
        # Vary one variable at a time, the others at the message's values and then at random
        # ones: a dependency shows as a changing value, a copy as the probe itself.
        for round_ in range(2):
            if round_:
                for i in candidates:
                    ctx.setConcreteVariableValue(vs[i], self.rng.randrange(256))
            for i in candidates:
                keep = ctx.getConcreteVariableValue(vs[i])
                seen = []
                for x in probes:
                    ctx.setConcreteVariableValue(vs[i], x)
                    seen.append(int(b.evaluate()))
                ctx.setConcreteVariableValue(vs[i], keep)
                if len(set(seen)) > 1:
                    deps.add(i)
                copies[i] += seen == list(probes)
        for i, x in saved.items():
            ctx.setConcreteVariableValue(vs[i], x)
        exact = next((i for i in candidates if copies[i] == 2), None)
        return deps, exact, set(candidates)

    def branch_variables(self, src: int) -> tuple[set[int], bool]:
        for pc in self.ctx.getPathConstraints():
            for br in pc.getBranchConstraints():
                if br["isTaken"] and br["srcAddr"] == src:
                    return self.variables(br["constraint"]), br["dstAddr"] != src + 2
        raise AssertionError(f"no path constraint at {src:#x}")


@pytest.fixture(scope="module")
def snippet_tracker(snippet_image: ServiceImage) -> TaintTracker:
    return TaintTracker(Sandbox(snippet_image))


def _snippet_messages() -> list[bytes]:
    rng = random.Random(11)
    out = []
    for i in range(6):
        data = bytearray(rng.randrange(256) for _ in range(64))
        data[50] = 0x41 if i % 2 else data[50] ^ 0x41 or 1  # the compared byte: equal or not
        if i % 3 == 0:
            data[9] |= 0x80  # the sign-extended byte negative ...
        elif i % 3 == 1:
            data[9] &= 0x7F  # ... or positive
        out.append(bytes(data))
    return out


def _offset(label: int | None) -> int | None:
    """The message offset of an engine label (one message here, so message 0)."""
    if label is None:
        return None
    assert label >> 16 == 0
    return label & 0xFFFF


def _agree(
    ours: int | None,
    triton_view: tuple[set[int], int | None, set[int]],
    where: str,
    arithmetic: bool = False,
) -> None:
    """No under-taint: a byte that depends on the message is tainted, with a label among the
    bytes it depends on. An exact copy carries exactly its source's label. A byte Triton proves
    constant is clean, except in an arithmetic result: the engine labels every byte of a sum
    (carries), an over-approximation that is safe for detection; there the label must still
    name an operand byte."""
    deps, exact, syntactic = triton_view
    if not deps:
        if arithmetic and ours is not None:
            assert ours in syntactic, f"{where}: m{ours} is not even an operand"
            return
        assert ours is None, f"{where}: we label m{ours}, Triton says it is constant"
        return
    assert ours is not None, f"{where}: we lost the taint of {sorted(deps)}"
    assert ours in deps, f"{where}: we label m{ours}, Triton says it depends on {sorted(deps)}"
    if exact is not None:
        assert ours == exact, f"{where}: a copy of m{exact}, we say m{ours}"


@pytest.mark.parametrize("data", _snippet_messages(), ids=lambda d: d[:4].hex())
def test_byte_labels_agree_with_triton(
    data: bytes, snippet_image: ServiceImage, snippet_tracker: TaintTracker
) -> None:
    run = snippet_tracker.run([Message(data)])
    assert run.result.outcome == Outcome.BLOCKED and run.detection is None
    oracle = TritonView(snippet_image, data)
    for reg in REGS:
        ours = snippet_tracker.regs.get(reg, [None] * 8)
        for k, view in enumerate(oracle.register(reg)):
            _agree(_offset(ours[k]), view, f"{reg} byte {k}", arithmetic=reg == "r12")
    out = oracle.sym("out")
    for k, view in enumerate(oracle.memory(out, OUT_BYTES)):
        _agree(_offset(snippet_tracker.mem.get(out + k)), view, f"out+{k}")
    # The one branch: both see the same message byte decide it, in the same direction.
    (cond,) = run.conditions
    variables, taken = oracle.branch_variables(cond.pc)
    assert {r.offset for r in cond.left if r is not None} == variables == {50}
    assert cond.taken == taken == (data[50] == 0x41)


# A CodeRed-class variant whose hijacked jump lands on bytes unicorn cannot decode (unicorn then
# reports the instruction's size as 0xf1f1f1f1): its detection once spent 6-10 s allocating a
# 4 GiB buffer to read "the instruction" and past the detector's job timeout lost the alert.
UNDECODABLE_TARGET = (
    b"GET /uVfNS/3/5TzM?g9iC--Msnze0HsNgnAp6v-yi5um4K4BfZf5RsZiTEbk-FLWpZ2FISz~uYIS~BzZ_VH3wX"
    b"cDbOS6LT5fyrTBaC3mc5ozGkX5ZiJSNo9T1tdCidJbFwTmCXCGb3qjxGvxQTdkCXdGT9SkLBTN7EBe0B9KSTbk4q"
    b"7JmUCNPYg99E8~2147e6mtsEH7f3NG HTTP/1.1\r\nAccept: */*\r\nConnection: close\r\nUser-Agent:",
    b" Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Firefox/115.0\r\n"
    b"Accept-Language: en-US,en;q=0.8\r\n\r\n",
)


def test_a_hijack_onto_undecodable_bytes_is_detected_without_huge_reads(
    detectors: dict[str, Detector], monkeypatch: pytest.MonkeyPatch
) -> None:
    import unicorn

    sizes: list[int] = []
    real = unicorn.Uc.mem_read

    def spy(self: Any, address: int, size: int) -> Any:
        sizes.append(size)
        return real(self, address, size)

    monkeypatch.setattr(unicorn.Uc, "mem_read", spy)
    detector = detectors["httpd"]
    detector.tracker.cache.clear()  # decode every instruction afresh, through the spy
    run = detector.inspect(tuple(Message(m, 0) for m in UNDECODABLE_TARGET))
    assert run.detection is not None
    assert isinstance(run.detection.verification, ExecutionControl)
    assert sizes and max(sizes) <= 1 << 20  # no read of 0xf1f1f1f1 bytes


def test_a_big_mapping_clears_only_the_taint_inside_it(
    detectors: dict[str, Detector],
) -> None:
    tracker = detectors["resolver"].tracker
    tracker._reset()
    base = 0x7000_0000
    tracker.mem.update({base - 1: 1, base: 2, base + (32 << 20) - 1: 3, base + (32 << 20): 4})
    tracker._kernel_write(base, 32 << 20)  # a 32 MiB mmap: 4 lookups, not 33 million
    assert tracker.mem == {base - 1: 1, base + (32 << 20): 4}
    tracker._kernel_write(base - 1, 2)  # a small write: address by address
    assert tracker.mem == {base + (32 << 20): 4}


@pytest.mark.parametrize("name", SAMPLES)
def test_generated_steps_label_like_the_generic_handlers(
    name: str, images: dict[str, ServiceImage], cases: dict[str, list[ExploitCase]],
    benign: dict[str, list[list[Message]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handlers written into each instruction's generated step (moves, extensions, ALU,
    compares, shifts, smears) give exactly the labels, conditions and detections of the
    engine's generic handlers, which every instruction runs when no source is generated."""
    from sca.taint import steps

    sessions = [cases[name][0].messages, cases[name][1].messages, *benign[name][:3]]

    def replay() -> list[tuple[object, ...]]:
        tracker = TaintTracker(Sandbox(images[name]))
        out = []
        for messages in sessions:
            for conditions in (True, False):
                run = tracker.run(messages, conditions=conditions)
                d = run.detection
                out.append((run.result.outcome, run.result.sent,
                            d and (d.verification, d.pc, d.site), run.conditions,
                            run.instructions, run.tainted_instructions, run.memory,
                            {r: list(t) for r, t in tracker.regs.items()}))
        return out

    generated = replay()
    monkeypatch.setattr(steps, "_body", lambda insn: None)  # a call of the generic handler
    monkeypatch.setattr(steps, "_FACTORIES", {})
    assert replay() == generated
    assert any(r[2] is not None for r in generated) and any(r[3] for r in generated)
