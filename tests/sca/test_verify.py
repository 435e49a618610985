"""Alert verification (sca.verify): real alerts verify, dressed-up benign traffic never does,
every refusal reason is reachable and precise, hostile alerts are refuted within the budget, and
10,000 mutated alerts never crash the verifier and never verify unless they are exploits.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest

from sca.alert import (
    Alert,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
    Verification,
    verification_refs,
)
from sca.codec import AlertFormatError, decode_alert, encode_alert
from sca.emu.image import ServiceImage
from sca.emu.sandbox import Budget, Outcome
from sca.generate import Detector, Generated
from sca.services import SAMPLES
from sca.verify import (
    MIN_ARGUMENT_BYTES,
    NONCE_ALPHABET,
    TRAP_LEN,
    TRAP_PREFIX,
    TRAP_SUFFIX,
    VERIFY_BUDGET,
    Reason,
    Verifier,
    patch,
)

Get = Callable[[str, int], Generated]
N_CASES = 21


def _alert(
    image: ServiceImage, messages: list[Message] | tuple[Message, ...], v: Verification
) -> Alert:
    return Alert(image.service_id, image.name, tuple(messages), v)


# -- real alerts -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_every_exploit_alert_verifies(name: str, generated: Get, verifier: Verifier) -> None:
    for i in range(N_CASES):
        g = generated(name, i)
        assert g.verdict.verified and g.verdict.reason == Reason.VERIFIED
        # Again, with fresh nonces, and after the codec round trip a receiver goes through.
        again = verifier.verify(decode_alert(encode_alert(g.alert)))
        assert again.verified, (i, again)


@pytest.mark.parametrize("name", SAMPLES)
def test_verification_is_stable_across_nonces(
    name: str, generated: Get, verifier: Verifier
) -> None:
    alert = generated(name, 0).alert
    verdicts = [verifier.verify(alert) for _ in range(30)]
    assert all(v.verified for v in verdicts), Counter(v.reason for v in verdicts)
    outcomes = {v.outcome for v in verdicts}
    expected = (
        {Outcome.FAULT}
        if alert.type.value == "execution-control"
        else ({Outcome.TRAP} if alert.type.value == "code-execution" else {Outcome.BLOCKED})
    )
    assert outcomes == expected


def test_verified_runs_do_not_leak_into_the_next(
    generated: Get,
    verifier: Verifier,
    benign: dict[str, list[list[Message]]],
    images: dict[str, ServiceImage],
) -> None:
    """Interleaving exploits and dressed-up benign alerts on one sandbox changes no verdict."""
    img = images["resolver"]
    fake = _alert(img, benign["resolver"][0][:1], ExecutionControl((ByteRef(0, 0),)))
    real = generated("resolver", 0).alert
    for _ in range(20):
        assert verifier.verify(real).verified
        assert not verifier.verify(fake).verified


# -- benign traffic dressed up as alerts -------------------------------------------------------
def _random_verification(rng: random.Random, messages: list[Message]) -> Verification:
    m = rng.randrange(len(messages))
    size = len(messages[m].data)
    kind = rng.randrange(3)
    if kind == 0:
        k = rng.randint(1, min(8, size))
        if rng.random() < 0.7:
            start = rng.randrange(size - k + 1)
            refs = tuple(ByteRef(m, start + i) for i in range(k))
        else:
            refs = tuple(ByteRef(m, o) for o in rng.sample(range(size), k))
        return ExecutionControl(refs)
    if kind == 1 and size >= TRAP_LEN:
        return CodeExecution(ByteRef(m, rng.randrange(size - TRAP_LEN + 1)))
    n = rng.randint(MIN_ARGUMENT_BYTES, max(MIN_ARGUMENT_BYTES, min(24, size)))
    n = min(n, size)
    start = rng.randrange(size - n + 1)
    return FunctionArgument(
        "execve", rng.randint(0, 1), tuple(ByteRef(m, start + i) for i in range(n))
    )


@pytest.mark.parametrize("name", SAMPLES)
def test_benign_messages_dressed_up_as_alerts_never_verify(
    name: str,
    verifier: Verifier,
    images: dict[str, ServiceImage],
    benign: dict[str, list[list[Message]]],
) -> None:
    rng = random.Random(f"dress-{name}")
    img = images[name]
    reasons: Counter[Reason] = Counter()
    types: Counter[str] = Counter()
    for messages in benign[name]:
        for _ in range(6):
            v = _random_verification(rng, messages)
            if isinstance(v, FunctionArgument) and len(v.bytes) < MIN_ARGUMENT_BYTES:
                continue
            verdict = verifier.verify(_alert(img, messages, v))
            assert not verdict.verified, (messages, v, verdict)
            reasons[verdict.reason] += 1
            types[v.type.value] += 1
    assert set(reasons) == {Reason.NOT_REACHED}, reasons
    assert len(types) == 3, types


# -- refusals ----------------------------------------------------------------------------------
def test_unknown_service(generated: Get, images: dict[str, ServiceImage]) -> None:
    """A node that does not run the service cannot check the alert (nor act on it)."""
    only_resolver = Verifier([images["resolver"]])
    for name in ("httpd", "rpcd", "mgmtd"):
        verdict = only_resolver.verify(generated(name, 0).alert)
        assert (verdict.verified, verdict.reason) == (False, Reason.UNKNOWN_SERVICE)
        assert generated(name, 0).alert.service_id.hex() in verdict.detail
        assert verdict.outcome is None, "refused before any run"
    alert = generated("resolver", 0).alert
    for sid in (bytes(32), os.urandom(32), b"short"):
        assert only_resolver.verify(replace(alert, service_id=sid)).reason == (
            Reason.UNKNOWN_SERVICE
        )


def test_same_messages_under_another_services_id_do_not_verify(
    generated: Get, verifier: Verifier, images: dict[str, ServiceImage]
) -> None:
    """The id names the binary: an httpd exploit claimed for mgmtd (both TCP) is refuted."""
    alert = generated("httpd", 0).alert
    for other in ("mgmtd", "rpcd"):
        verdict = verifier.verify(replace(alert, service_id=images[other].service_id))
        assert (verdict.verified, verdict.reason) == (False, Reason.NOT_REACHED)


def test_wrong_protocol(generated: Get, verifier: Verifier) -> None:
    udp = generated("resolver", 0).alert
    as_tcp = replace(udp, messages=tuple(Message(m.data, 0) for m in udp.messages))
    tcp = generated("httpd", 0).alert
    as_udp = replace(tcp, messages=tuple(Message(m.data, None) for m in tcp.messages))
    mixed = replace(tcp, messages=(*tcp.messages, Message(b"x", None)))
    for alert in (as_tcp, as_udp, mixed):
        verdict = verifier.verify(alert)
        assert (verdict.verified, verdict.reason, verdict.outcome) == (
            False,
            Reason.WRONG_PROTOCOL,
            None,
        )


@pytest.mark.parametrize("name", SAMPLES)
def test_offsets_out_of_range(name: str, generated: Get, verifier: Verifier) -> None:
    alert = generated(name, 0).alert
    n = len(alert.messages)
    size = len(alert.messages[0].data)
    bad_refs = [ByteRef(n, 0), ByteRef(0, size), ByteRef(0, -1), ByteRef(-1, 0), ByteRef(0, 10**9)]
    for bad in bad_refs:
        for v in (
            ExecutionControl((bad,)),
            CodeExecution(bad),
            FunctionArgument("execve", 0, (ByteRef(0, 0), ByteRef(0, 1), ByteRef(0, 2), bad)),
        ):
            verdict = verifier.verify(replace(alert, verification=v))
            assert (verdict.verified, verdict.reason) == (False, Reason.OFFSET_OUT_OF_RANGE)
            assert verdict.outcome is None
    no_messages = replace(alert, messages=())
    assert verifier.verify(no_messages).reason == Reason.OFFSET_OUT_OF_RANGE
    nine = ExecutionControl(tuple(ByteRef(0, i) for i in range(9)))
    assert verifier.verify(replace(alert, verification=nine)).reason == (Reason.OFFSET_OUT_OF_RANGE)


def test_code_execution_without_room_for_the_trap(generated: Get, verifier: Verifier) -> None:
    alert = generated("rpcd", 0).alert
    assert isinstance(alert.verification, CodeExecution)
    size = len(alert.messages[alert.verification.code.message].data)
    for offset in (size - TRAP_LEN + 1, size - 2, size - 1):
        v = CodeExecution(ByteRef(alert.verification.code.message, offset))
        verdict = verifier.verify(replace(alert, verification=v))
        assert (verdict.verified, verdict.reason) == (False, Reason.NO_ROOM_FOR_TRAP)
    v = CodeExecution(ByteRef(alert.verification.code.message, size - TRAP_LEN))
    assert verifier.verify(replace(alert, verification=v)).reason != Reason.NO_ROOM_FOR_TRAP


def test_too_few_function_argument_bytes(generated: Get, verifier: Verifier) -> None:
    alert = generated("mgmtd", 0).alert
    v = alert.verification
    assert isinstance(v, FunctionArgument) and len(v.bytes) >= MIN_ARGUMENT_BYTES
    for k in range(MIN_ARGUMENT_BYTES):
        short = replace(v, bytes=v.bytes[:k])
        verdict = verifier.verify(replace(alert, verification=short))
        assert (verdict.verified, verdict.reason) == (False, Reason.TOO_FEW_ARGUMENT_BYTES)
    exact = replace(v, bytes=v.bytes[:MIN_ARGUMENT_BYTES])
    assert verifier.verify(replace(alert, verification=exact)).verified


def test_unknown_critical_call(generated: Get, verifier: Verifier) -> None:
    alert = generated("mgmtd", 0).alert
    assert isinstance(alert.verification, FunctionArgument)
    for call in ("system", "", "execveat", "EXECVE"):
        v = replace(alert.verification, call=call)
        verdict = verifier.verify(replace(alert, verification=v))
        assert (verdict.verified, verdict.reason) == (False, Reason.UNKNOWN_CALL)


def test_wrong_argument_or_type_does_not_verify(generated: Get, verifier: Verifier) -> None:
    """The alert must say what the exploit really controls."""
    fa = generated("mgmtd", 0).alert
    assert isinstance(fa.verification, FunctionArgument)
    argv = replace(fa.verification, argument=1)
    assert not verifier.verify(replace(fa, verification=argv)).verified
    refs = fa.verification.bytes
    for v in (ExecutionControl(refs[:8]), CodeExecution(refs[0])):
        assert not verifier.verify(replace(fa, verification=v)).verified
    ec = generated("resolver", 0).alert
    ec_refs = verification_refs(ec.verification)
    for v2 in (CodeExecution(ec_refs[0]), FunctionArgument("execve", 0, ec_refs)):
        assert not verifier.verify(replace(ec, verification=v2)).verified


# -- hostile alerts ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_verifier(hostile_image: ServiceImage) -> Verifier:
    return Verifier([hostile_image])  # the default verification budget


@pytest.mark.parametrize("command", [b"L", b"Y", b"F", b"W", b"R", b"M", b"N"])
def test_hostile_alerts_are_refuted_within_the_budget(
    command: bytes, hostile_image: ServiceImage, hostile_verifier: Verifier
) -> None:
    data = command + b"-" * 40
    wall = VERIFY_BUDGET.wall_ms / 1000
    for v in (
        ExecutionControl(tuple(ByteRef(0, 8 + i) for i in range(4))),
        CodeExecution(ByteRef(0, 4)),
        FunctionArgument("execve", 0, tuple(ByteRef(0, 10 + i) for i in range(6))),
    ):
        start = time.perf_counter()
        verdict = hostile_verifier.verify(_alert(hostile_image, [Message(data)], v))
        took = time.perf_counter() - start
        assert not verdict.verified, verdict
        assert verdict.reason in (Reason.BUDGET, Reason.NOT_REACHED)
        if command in (b"L", b"Y", b"F", b"W"):
            assert verdict.reason == Reason.BUDGET, verdict
        assert took < wall + 1.0, f"{command!r}: {took:.2f} s"


def test_the_verifier_budget_is_the_one_given(hostile_image: ServiceImage) -> None:
    tight = Verifier([hostile_image], Budget(instructions=100_000, memory=2 << 20, wall_ms=50))
    alert = _alert(hostile_image, [Message(b"Y" + b"-" * 20)], CodeExecution(ByteRef(0, 4)))
    start = time.perf_counter()
    verdict = tight.verify(alert)
    assert verdict.reason == Reason.BUDGET
    assert time.perf_counter() - start < 0.5


# -- a verified alert must be an exploit ---------------------------------------------------------
def test_benign_session_with_a_line_end_at_the_offsets_does_not_verify(
    images: dict[str, ServiceImage], verifier: Verifier, detectors: dict[str, Detector]
) -> None:
    data = b"RUN status " + b"A" * 31 + b"\r\nPING\n"  # a 31-byte tag fits; then a PING
    at = data.index(b"\nPING")
    v = FunctionArgument("execve", 0, tuple(ByteRef(0, at + i) for i in range(5)))
    alert = _alert(images["mgmtd"], [Message(data, 0)], v)
    run = detectors["mgmtd"].inspect(alert.messages)
    assert run.detection is None and run.result.outcome == Outcome.BLOCKED  # benign as sent
    assert not verifier.verify(alert).verified


# -- mutation ----------------------------------------------------------------------------------
def _with_refs(v: Verification, refs: list[ByteRef]) -> Verification:
    if isinstance(v, ExecutionControl):
        return ExecutionControl(tuple(refs))
    if isinstance(v, CodeExecution):
        return CodeExecution(refs[0])
    return replace(v, bytes=tuple(refs))


class Mutator:
    """Random edits of real alerts: message bytes, lengths, counts, order and connections;
    offsets, message indexes and lengths of the references; the alert type, call and
    argument; the service id."""

    def __init__(
        self, rng: random.Random, ids: list[bytes], benign: dict[str, list[list[Message]]]
    ) -> None:
        self.rng = rng
        self.ids = ids
        self.pool = [m for sessions in benign.values() for s in sessions for m in s]

    def __call__(self, alert: Alert) -> Alert:
        rng = self.rng
        msgs = list(alert.messages)
        v = alert.verification
        sid = alert.service_id
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(13)
            refs = list(verification_refs(v))
            if op == 0 and msgs:  # overwrite message bytes
                i = rng.randrange(len(msgs))
                data = bytearray(msgs[i].data)
                for _ in range(rng.randint(1, 4)):
                    if data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                msgs[i] = Message(bytes(data), msgs[i].connection)
            elif op == 1:  # move one reference
                j = rng.randrange(len(refs))
                d = rng.choice((-3, -2, -1, 1, 2, 3, rng.randint(-300, 300)))
                refs[j] = ByteRef(refs[j].message, refs[j].offset + d)
                v = _with_refs(v, refs)
            elif op == 2:  # point a reference into another message
                j = rng.randrange(len(refs))
                refs[j] = ByteRef(refs[j].message + rng.choice((-1, 1, 2)), refs[j].offset)
                v = _with_refs(v, refs)
            elif op == 3:  # change the type, keeping the references
                kind = rng.randrange(3)
                if kind == 0:
                    v = ExecutionControl(tuple(refs[: rng.randint(1, 9)]))
                elif kind == 1:
                    v = CodeExecution(rng.choice(refs))
                else:
                    v = FunctionArgument(
                        rng.choice(("execve", "execve", "system")), rng.randint(0, 2), tuple(refs)
                    )
            elif op == 4 and msgs:  # drop a message
                del msgs[rng.randrange(len(msgs))]
            elif op == 5 and msgs:  # repeat a message
                msgs.insert(rng.randrange(len(msgs) + 1), rng.choice(msgs))
            elif op == 6:  # insert a benign message of any service
                msgs.insert(rng.randrange(len(msgs) + 1), rng.choice(self.pool))
            elif op == 7 and msgs:  # cut or extend a message
                i = rng.randrange(len(msgs))
                data = msgs[i].data
                if rng.random() < 0.5:
                    data = data[: rng.randrange(len(data) + 1)]
                else:
                    data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
                msgs[i] = Message(data, msgs[i].connection)
            elif op == 8 and msgs:  # renumber a connection
                i = rng.randrange(len(msgs))
                msgs[i] = Message(msgs[i].data, rng.choice((None, 0, 1, 2, rng.randint(0, 9))))
            elif op == 9:  # another service id
                sid = rng.choice([*self.ids, bytes(32)])
            elif op == 10:  # fewer or more references
                if len(refs) > 1 and rng.random() < 0.5:
                    refs = refs[: rng.randrange(1, len(refs))]
                elif msgs:
                    for _ in range(rng.randint(1, 5)):
                        i = rng.randrange(len(msgs))
                        refs.append(ByteRef(i, rng.randrange(max(1, len(msgs[i].data)))))
                v = _with_refs(v, refs)
            elif op == 11 and len(msgs) > 1:
                rng.shuffle(msgs)
            elif op == 12:  # reverse or shuffle the reference order
                if rng.random() < 0.5:
                    refs.reverse()
                else:
                    rng.shuffle(refs)
                v = _with_refs(v, refs)
        return Alert(sid, alert.service_name, tuple(msgs), v)


def _as_verified(alert: Alert, rng: random.Random) -> tuple[Message, ...]:
    """The alert's messages with verifier-style values at its offsets: what the verifier ran."""
    v = alert.verification
    if isinstance(v, CodeExecution):
        value = TRAP_PREFIX + bytes(rng.choice(NONCE_ALPHABET) for _ in range(8)) + TRAP_SUFFIX
        refs = tuple(ByteRef(v.code.message, v.code.offset + i) for i in range(TRAP_LEN))
        return patch(alert.messages, refs, value)
    refs = verification_refs(v)
    return patch(alert.messages, refs, bytes(rng.choice(NONCE_ALPHABET) for _ in refs))


@pytest.mark.slow
def test_ten_thousand_mutated_alerts(
    generated: Get,
    verifier: Verifier,
    detectors: dict[str, Detector],
    images: dict[str, ServiceImage],
    benign: dict[str, list[list[Message]]],
) -> None:
    rng = random.Random(20240601)
    bases = [generated(name, i).alert for name in SAMPLES for i in range(6)]
    by_id = {img.service_id: name for name, img in images.items()}
    mutate = Mutator(rng, list(by_id), benign)
    reasons: Counter[Reason] = Counter()
    verified: list[Alert] = []
    codec_refused = 0
    for _ in range(10_000):
        mutant = mutate(rng.choice(bases))
        if rng.random() < 0.5:
            # Through the codec, as a receiver gets it; what the codec refuses the verifier must
            # still handle without raising (it is the last line of defence).
            try:
                assert decode_alert(encode_alert(mutant)) == mutant
            except AlertFormatError:
                codec_refused += 1
        verdict = verifier.verify(mutant)
        assert verdict.verified == (verdict.reason == Reason.VERIFIED)
        reasons[verdict.reason] += 1
        if verdict.verified:
            verified.append(mutant)
    # The mutations reach every refusal and still leave many real exploits.
    assert set(reasons) >= set(Reason) - {Reason.BUDGET}, reasons
    assert len(verified) > 500, reasons
    assert codec_refused > 100

    seen: dict[tuple[bytes, tuple[Message, ...]], bool] = {}

    def detects(sid: bytes, messages: tuple[Message, ...]) -> bool:
        key = (sid, messages)
        if key not in seen:
            seen[key] = detectors[by_id[sid]].inspect(messages).detection is not None
        return seen[key]

    not_as_sent = []
    for mutant in verified:
        if detects(mutant.service_id, mutant.messages):
            continue
        # See test_benign_session_with_a_line_end_at_the_offsets_does_not_verify: the exploit
        # may need the verifier's bytes at the offsets. It must be one with them.
        not_as_sent.append(mutant)
        assert detects(mutant.service_id, _as_verified(mutant, rng)), mutant
    assert len(not_as_sent) <= len(verified) // 100, not_as_sent[:3]
