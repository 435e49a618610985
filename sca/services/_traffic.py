"""Helpers shared by the sample services' traffic generators."""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

from sca.alert import ByteRef, Message, Verification

LETTERS = string.ascii_letters
ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class ExploitCase:
    """An exploit's messages plus the ground truth of what a detector should point at.

    ``verification`` uses the alert model's conventions: for execution-control, the message
    bytes that end up in the hijacked target, least significant first; for code-execution, the
    first injected byte executed; for function-argument, the bytes of the critical argument.
    Terminators the service writes itself (a NUL over a space or a newline) are not listed:
    they are not the attacker's bytes.
    """

    messages: tuple[Message, ...]
    verification: Verification


def word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    """A random string of ``lo`` to ``hi`` characters from ``alphabet``."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def split(data: bytes, rng: random.Random | None, parts: int = 2) -> list[bytes]:
    """``data`` cut at random points into ``parts`` non-empty chunks (as a client's several
    send calls would); one chunk when there is no rng or too little data."""
    if rng is None or parts < 2 or len(data) < parts:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), parts - 1))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def tcp_session(connections: Sequence[Sequence[bytes]]) -> list[Message]:
    """Messages for connections served one after another: all chunks of connection 0, then
    of connection 1, ... (the sample servers handle one connection at a time)."""
    return [Message(chunk, conn) for conn, chunks in enumerate(connections) for chunk in chunks]


def stream_refs(
    messages: Sequence[Message], connection: int | None, start: int, length: int
) -> tuple[ByteRef, ...]:
    """ByteRefs for bytes ``start`` .. ``start + length - 1`` of TCP connection
    ``connection``'s byte stream, wherever the chunking put them (a range may straddle two
    chunks)."""
    refs: list[ByteRef] = []
    pos = 0
    for index, msg in enumerate(messages):
        if msg.connection != connection:
            continue
        lo, hi = pos, pos + len(msg.data)
        for off in range(max(lo, start), min(hi, start + length)):
            refs.append(ByteRef(index, off - lo))
        pos = hi
    if len(refs) != length:
        raise ValueError("stream range lies outside the connection's bytes")
    return tuple(refs)


def datagram_refs(message: int, start: int, length: int) -> tuple[ByteRef, ...]:
    """ByteRefs for ``length`` bytes from ``start`` in datagram number ``message``."""
    return tuple(ByteRef(message, start + i) for i in range(length))
