"""Alert verification in a fresh flash clone (Vigilante's self-certification).

The verifier never trusts the alert's own bytes at the offsets it names. It puts values there
that the attacker cannot predict, replays the messages without taint at full emulator speed, and
says verified only if its own value shows up where the alert claims the attacker has control:

- execution-control: a random address; verified when the service fetches from it;
- code-execution: a trap sequence (``movabs rax, NONCE; syscall``); verified when that syscall
  arrives with the nonce;
- function-argument: a random string; verified when it arrives in execve's argument.

Bytes are drawn from letters and digits so they survive string copies and protocol parsing
(no NUL, space, CR/LF, '?', '&' ...). A benign message dressed up as an alert cannot verify: the
nonce never reaches a control transfer or the critical call.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

from sca.alert import (
    CRITICAL_CALLS,
    Alert,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
    Messages,
)
from sca.emu.image import ServiceImage
from sca.emu.kernel import Kernel
from sca.emu.sandbox import Budget, Outcome, RunResult, Sandbox

NONCE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
TRAP_PREFIX = b"\x48\xb8"  # movabs rax, imm64
TRAP_SUFFIX = b"\x0f\x05"  # syscall
TRAP_LEN = len(TRAP_PREFIX) + 8 + len(TRAP_SUFFIX)
MIN_ARGUMENT_BYTES = 4  # fewer nonce bytes could turn up in a benign execve by chance
VERIFY_BUDGET = Budget(instructions=5_000_000, memory=64 << 20, wall_ms=500)


class Reason(StrEnum):
    VERIFIED = "verified"
    UNKNOWN_SERVICE = "unknown-service"
    WRONG_PROTOCOL = "wrong-protocol"
    OFFSET_OUT_OF_RANGE = "offset-out-of-range"
    NO_ROOM_FOR_TRAP = "no-room-for-trap"
    TOO_FEW_ARGUMENT_BYTES = "too-few-argument-bytes"
    UNKNOWN_CALL = "unknown-critical-call"
    NOT_REACHED = "trap-not-reached"
    BUDGET = "budget-exhausted"


@dataclass(frozen=True, slots=True)
class Verdict:
    verified: bool
    reason: Reason
    detail: str
    elapsed_s: float
    outcome: Outcome | None = None

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


def nonce(n: int, rng: secrets.SystemRandom | None = None) -> bytes:
    r = rng or secrets.SystemRandom()
    return bytes(r.choice(NONCE_ALPHABET) for _ in range(n))


def patch(messages: Messages, refs: tuple[ByteRef, ...], value: bytes) -> Messages:
    data = [bytearray(m.data) for m in messages]
    for ref, b in zip(refs, value, strict=True):
        data[ref.message][ref.offset] = b
    return tuple(Message(bytes(d), m.connection) for d, m in zip(data, messages, strict=True))


class Verifier:
    """Verifies alerts for the services it knows, one reusable sandbox per service."""

    def __init__(self, images: list[ServiceImage], budget: Budget = VERIFY_BUDGET) -> None:
        self.images = {img.service_id: img for img in images}
        self.budget = budget
        self._sandboxes: dict[bytes, Sandbox] = {}

    def sandbox(self, service_id: bytes) -> Sandbox | None:
        sb = self._sandboxes.get(service_id)
        if sb is None:
            img = self.images.get(service_id)
            if img is None:
                return None
            sb = self._sandboxes[service_id] = Sandbox(img, self.budget)
        return sb

    def verify(self, alert: Alert) -> Verdict:
        start = time.perf_counter()

        def refuse(reason: Reason, detail: str, outcome: Outcome | None = None) -> Verdict:
            return Verdict(False, reason, detail, time.perf_counter() - start, outcome)

        sb = self.sandbox(alert.service_id)
        if sb is None:
            return refuse(Reason.UNKNOWN_SERVICE, f"no service with id {alert.service_id.hex()}")
        datagrams = sb.image.proto == "udp"
        if any((m.connection is None) != datagrams for m in alert.messages):
            return refuse(Reason.WRONG_PROTOCOL,
                          f"{sb.image.name} is {sb.image.proto}; the messages do not match")
        for ref in alert.refs():
            if not (0 <= ref.message < len(alert.messages)
                    and 0 <= ref.offset < len(alert.messages[ref.message].data)):
                return refuse(Reason.OFFSET_OUT_OF_RANGE, f"{ref} is outside its message")
        v = alert.verification
        if isinstance(v, ExecutionControl):
            return self._execution_control(sb, alert.messages, v, refuse, start)
        if isinstance(v, CodeExecution):
            return self._code_execution(sb, alert.messages, v, refuse, start)
        return self._function_argument(sb, alert.messages, v, refuse, start)

    @staticmethod
    def _not_reached(result: RunResult, refuse, what: str) -> Verdict:  # type: ignore[no-untyped-def]
        if result.outcome == Outcome.BUDGET:
            return refuse(Reason.BUDGET, f"{what} not reached within the budget", result.outcome)
        detail = f"{what} not reached; the service {result.outcome.value}"
        if result.fault:
            detail += f" ({result.fault})"
        return refuse(Reason.NOT_REACHED, detail, result.outcome)

    def _execution_control(self, sb, messages, v: ExecutionControl, refuse, start):  # type: ignore[no-untyped-def]
        k = len(v.target)
        if k > 8:
            return refuse(Reason.OFFSET_OUT_OF_RANGE, "a target address has at most 8 bytes")
        # A trap address must be unmapped, or the service would run on instead of faulting.
        for _ in range(16):
            value = nonce(k)
            if not sb.is_mapped(int.from_bytes(value, "little")):
                break
        result = sb.run(patch(messages, v.target, value), budget=self.budget)
        addr = result.fetch_address
        if addr is not None and (addr & ((1 << (8 * k)) - 1)).to_bytes(k, "little") == value:
            return Verdict(True, Reason.VERIFIED, f"control reached trap address {addr:#x}",
                           time.perf_counter() - start, result.outcome)
        return self._not_reached(result, refuse, "trap address")

    def _code_execution(self, sb, messages, v: CodeExecution, refuse, start):  # type: ignore[no-untyped-def]
        msg = messages[v.code.message]
        if v.code.offset + TRAP_LEN > len(msg.data):
            return refuse(Reason.NO_ROOM_FOR_TRAP,
                          f"the code at {v.code} leaves less than {TRAP_LEN} bytes for the trap")
        value = nonce(8)
        trap = TRAP_PREFIX + value + TRAP_SUFFIX
        refs = tuple(ByteRef(v.code.message, v.code.offset + i) for i in range(TRAP_LEN))
        number = int.from_bytes(value, "little")

        def arm(kernel: Kernel) -> None:
            kernel.trap_number = number

        result = sb.run(patch(messages, refs, trap), budget=self.budget, prepare=arm)
        if result.outcome == Outcome.TRAP and sb.kernel.trap_hit == number:
            return Verdict(True, Reason.VERIFIED, "the injected trap code ran",
                           time.perf_counter() - start, result.outcome)
        return self._not_reached(result, refuse, "trap code")

    def _function_argument(self, sb, messages, v: FunctionArgument, refuse, start):  # type: ignore[no-untyped-def]
        if v.call not in CRITICAL_CALLS:
            return refuse(Reason.UNKNOWN_CALL, f"{v.call!r} is not a watched call")
        if len(v.bytes) < MIN_ARGUMENT_BYTES:
            return refuse(Reason.TOO_FEW_ARGUMENT_BYTES,
                          f"{len(v.bytes)} argument bytes; at least {MIN_ARGUMENT_BYTES} needed")
        # First as sent: the alert's own bytes must reach the call. Otherwise bytes that stop
        # the request short (a line end) could sit at the offsets, and the nonce, replacing
        # them, would make an exploit out of a benign session.
        own = bytes(messages[r.message].data[r.offset] for r in v.bytes)
        result = sb.run(messages, budget=self.budget)
        if not self._arrived(result, v, own):
            return self._not_reached(result, refuse,
                                     f"the alert's own bytes in {v.call} argument {v.argument}")
        value = nonce(len(v.bytes))
        result = sb.run(patch(messages, v.bytes, value), budget=self.budget)
        if self._arrived(result, v, value):
            return Verdict(True, Reason.VERIFIED, f"the nonce arrived in {v.call} argument "
                           f"{v.argument}", time.perf_counter() - start, result.outcome)
        return self._not_reached(result, refuse, f"nonce in {v.call} argument {v.argument}")

    @staticmethod
    def _arrived(result: RunResult, v: FunctionArgument, value: bytes) -> bool:
        for path, argv in result.execves():
            strings = (path,) if v.argument == 0 else argv
            if any(value in s for s in strings):
                return True
        return False
