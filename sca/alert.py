"""The self-certifying alert (SCA) model.

An alert holds only what a receiver needs to re-create the exploit in its own sandbox: the service
it targets, the ordered messages, and where in them the attacker's bytes control the outcome. Two
detectors that catch the same exploit therefore write byte-identical alerts (see ``sca.codec``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

FORMAT_VERSION = 1
MAX_MESSAGES = 16
MAX_TOTAL_BYTES = 64 * 1024
SERVICE_ID_LEN = 32
MAX_SERVICE_NAME = 64
# Calls a function-argument alert may name; execve is the one the sandbox watches (see sca.emu).
CRITICAL_CALLS = ("execve",)


class AlertType(StrEnum):
    EXECUTION_CONTROL = "execution-control"
    CODE_EXECUTION = "code-execution"
    FUNCTION_ARGUMENT = "function-argument"


@dataclass(frozen=True, slots=True)
class Message:
    """One input to the service: a datagram (``connection is None``) or a chunk of a TCP
    connection; chunks with the same connection number belong to one accepted connection, and
    connections are accepted in order of their first chunk."""

    data: bytes
    connection: int | None = None


@dataclass(frozen=True, slots=True, order=True)
class ByteRef:
    """A byte of the alert: ``offset`` within message number ``message``."""

    message: int
    offset: int


@dataclass(frozen=True, slots=True)
class ExecutionControl:
    """The bytes that become a control-transfer target, least significant first."""

    target: tuple[ByteRef, ...]

    type = AlertType.EXECUTION_CONTROL


@dataclass(frozen=True, slots=True)
class CodeExecution:
    """The first byte of injected code that the service ends up executing."""

    code: ByteRef

    type = AlertType.CODE_EXECUTION


@dataclass(frozen=True, slots=True)
class FunctionArgument:
    """The bytes that arrive in argument ``argument`` of the critical ``call``
    (for execve: 0 is the path, 1 is argv, each string's bytes in order)."""

    call: str
    argument: int
    bytes: tuple[ByteRef, ...]

    type = AlertType.FUNCTION_ARGUMENT


Verification = ExecutionControl | CodeExecution | FunctionArgument
Messages = tuple[Message, ...]


def map_refs(v: Verification, f: Callable[[ByteRef], ByteRef]) -> Verification:
    """The same verification info with every reference passed through ``f``."""
    if isinstance(v, ExecutionControl):
        return ExecutionControl(tuple(f(r) for r in v.target))
    if isinstance(v, CodeExecution):
        return CodeExecution(f(v.code))
    return FunctionArgument(v.call, v.argument, tuple(f(r) for r in v.bytes))


def verification_refs(v: Verification) -> tuple[ByteRef, ...]:
    """Every message byte the verification info points at."""
    if isinstance(v, ExecutionControl):
        return v.target
    if isinstance(v, CodeExecution):
        return (v.code,)
    return v.bytes


@dataclass(frozen=True, slots=True)
class Alert:
    service_id: bytes
    service_name: str
    messages: tuple[Message, ...]
    verification: Verification
    version: int = FORMAT_VERSION

    @property
    def type(self) -> AlertType:
        return self.verification.type

    def refs(self) -> tuple[ByteRef, ...]:
        return verification_refs(self.verification)
