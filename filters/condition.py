"""The filter condition model: one model, evaluated in user space and compiled to nftables.

A condition is a conjunction over one message (a UDP datagram, or a TCP connection's reassembled
stream): byte pins (``m[o] == v``), then a vulnerable field located either at a fixed offset or
just after the first occurrence of a delimiter, and the overflow condition on that field:

- ``terminated``: the ``reach`` bytes from the field's start exist and none is a terminator, so
  a terminator-driven copy (strcpy and kin) reaches the overwritten slot;
- ``length``: an integer length field (``size`` bytes, little- or big-endian) is at least
  ``reach``, so a length-driven copy (memcpy) reaches it.

``Specific`` is the cheap first line: the exact bytes at fixed offsets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

MAX_REACH = 65536
MAX_TOKEN = 64
NEVER = -1  # Field.start: the field cannot start there
_FAIL, _MATCH, _UNDECIDED = 0, 1, 2


def _as_bytes(values: tuple[int, ...]) -> list[bytes]:
    return [bytes((v,)) for v in values]


@dataclass(frozen=True, slots=True)
class Pin:
    offset: int
    value: int
    why: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Field:
    """Where the vulnerable field starts: ``offset``, or, with ``delimiter`` set, right after
    the first ``delimiter`` byte at or after ``offset``; with ``stops``, only if none of those
    bytes comes before that delimiter (a request line's end, say), and with ``tokens``, only if
    the token before it (from the previous delimiter, or ``offset``) is one of them (the
    commands that reach the vulnerability)."""

    offset: int
    delimiter: int | None = None
    occurrence: int = 1  # after the n-th delimiter from ``offset`` on
    stops: tuple[int, ...] = ()
    tokens: tuple[bytes, ...] = ()

    def start(self, m: bytes, base: int = 0) -> int | None:
        """Where the field starts in ``m`` for a message that starts at ``base``: None while
        its delimiter has not come, ``NEVER`` if it cannot start there whatever comes."""
        if self.delimiter is None:
            return base + self.offset
        needle = bytes([self.delimiter])
        token = base + self.offset
        i = token - 1
        for _ in range(self.occurrence):
            token = i + 1
            i = m.find(needle, token)
            stop = self._stop(m, token, len(m) if i < 0 else i)
            if stop:
                return NEVER
            if i < 0:
                return None
        if self.tokens and m[token:i] not in self.tokens:
            return NEVER
        return i + 1

    def _stop(self, m: bytes, start: int, end: int) -> bool:
        return any(m.find(s, start, end) >= 0 for s in _as_bytes(self.stops))


@dataclass(frozen=True, slots=True)
class Overflow:
    kind: Literal["terminated", "length"]
    field: Field
    reach: int  # bytes from the field's start to the overwritten slot (terminated), or the
    # smallest length value that reaches it (length)
    terminators: tuple[int, ...] = ()  # terminated: bytes that stop the copy
    size: int = 0  # length: bytes of the length field
    little_endian: bool = True
    why: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class General:
    """Matches messages that exploit the vulnerability: every pin holds and the overflow
    condition holds."""

    pins: tuple[Pin, ...]
    overflow: Overflow
    # For a TCP stream: the exploit may follow other requests, so offsets count from any
    # position where the pins hold (a datagram is always matched from its first byte).
    sliding: bool = False

    def matches(self, m: bytes) -> bool:
        return self.scan(m)[0]

    def scan(self, m: bytes, resume: int = 0) -> tuple[bool, int]:
        """Whether ``m`` matches, and where a later scan of ``m`` grown longer may resume.

        A stream is scanned at each position where a message could start (from ``resume``
        on): each position is decided once for good (match or not) or found undecided (it
        needs bytes that have not come yet). Every later position needs later bytes still (the
        pins, field and window only move right with it), so the scan stops at the first
        undecided one and the next resumes there: a stream costs each position about once,
        however it is segmented."""
        if not self.sliding:
            return self._at(m, 0) == _MATCH, 0
        pins = self.pins
        if not pins:
            for b in range(resume, len(m)):
                r = self._at(m, b)
                if r != _FAIL:
                    return r == _MATCH, b
            return False, max(resume, len(m))
        first = pins[0]
        needle = bytes([first.value])
        i = m.find(needle, max(first.offset, resume + first.offset))
        while i >= 0:
            b = i - first.offset
            r = self._at(m, b)
            if r != _FAIL:
                return r == _MATCH, b
            i = m.find(needle, i + 1)
        return False, max(resume, len(m) - first.offset)

    def _at(self, m: bytes, base: int) -> int:
        """_MATCH, _FAIL or _UNDECIDED for a message starting at ``base``."""
        n = len(m)
        for p in self.pins:
            at = base + p.offset
            if at >= n:
                return _UNDECIDED
            if m[at] != p.value:
                return _FAIL
        o = self.overflow
        start = o.field.start(m, base)
        if start is None:
            return _UNDECIDED  # the delimiter may come
        if start == NEVER:
            return _FAIL
        if o.kind == "terminated":
            end = start + o.reach
            seen = min(end, n)
            if any(m.find(t, start, seen) >= 0 for t in _as_bytes(o.terminators)):
                return _FAIL
            return _MATCH if end <= n else _UNDECIDED
        if start + o.size > n:
            return _UNDECIDED
        raw = m[start:start + o.size]
        value = int.from_bytes(raw, "little" if o.little_endian else "big")
        return _MATCH if value >= o.reach else _FAIL

    def describe(self) -> list[str]:
        out = [f"byte {p.offset} is {p.value:#04x}" + (f" ({p.why})" if p.why else "")
               for p in self.pins]
        if self.sliding:
            out.insert(0, "anywhere in the connection's stream, counting from where the pins hold:")
        o = self.overflow
        nth = {1: "first", 2: "second", 3: "third"}.get(o.field.occurrence,
                                                      f"{o.field.occurrence}th")
        f = o.field
        where = (f"offset {f.offset}" if f.delimiter is None else
                 f"just after the {nth} {f.delimiter:#04x} byte at or after offset {f.offset}")
        if f.delimiter is not None and f.stops:
            where += f" (with none of {', '.join(f'{b:#04x}' for b in f.stops)} before it)"
        if f.delimiter is not None and f.tokens:
            where += f" after the token {' or '.join(repr(t) for t in f.tokens)}"
        if o.kind == "terminated":
            terms = ", ".join(f"{t:#04x}" for t in o.terminators)
            out.append(f"the {o.reach} bytes from {where} contain none of {terms} "
                       f"(the copy reaches the overwritten slot)" + (f"; {o.why}" if o.why else ""))
        else:
            endian = "little" if o.little_endian else "big"
            out.append(f"the {o.size}-byte {endian}-endian length at {where} is at least "
                       f"{o.reach} (the copy reaches the overwritten slot)"
                       + (f"; {o.why}" if o.why else ""))
        return out


@dataclass(frozen=True, slots=True)
class Specific:
    """The exact bytes ``value`` at ``offset``: cheap, blocks only this exploit's bytes."""

    offset: int
    value: bytes

    def matches(self, m: bytes) -> bool:
        return m[self.offset:self.offset + len(self.value)] == self.value

    def scan(self, m: bytes, resume: int = 0) -> tuple[bool, int]:
        return self.matches(m), 0

    def describe(self) -> list[str]:
        return [f"bytes {self.offset}..{self.offset + len(self.value) - 1} are "
                f"{self.value.hex()}"]


Condition = General | Specific


@dataclass(frozen=True)
class Filter:
    """A condition scoped to a service's protocol and port. Its identity is the service and the
    condition: the same condition from two alerts is one filter."""

    service_id: bytes
    service_name: str
    proto: Literal["udp", "tcp"]
    port: int
    condition: Condition

    @property
    def kind(self) -> str:
        return "general" if isinstance(self.condition, General) else "specific"

    @cached_property
    def filter_id(self) -> str:
        c = self.condition
        if isinstance(c, Specific):
            # The common, numerous kind (10,000 in a set): hashed without a JSON detour.
            body = b"specific\0%d\0" % c.offset + c.value
        else:
            body = json.dumps(_condition_json(c), sort_keys=True).encode()
        return hashlib.sha256(self.service_id + b"\0" + body).hexdigest()[:16]

    @property
    def anywhere(self) -> bool:
        """Whether the condition may hold from any position of a stream (a general filter on
        a TCP stream), so that a piece of a stream whose place in it is unknown can be checked."""
        return isinstance(self.condition, General) and self.condition.sliding

    def matches(self, message: bytes) -> bool:
        return self.condition.matches(message)

    def scan(self, stream: bytes, resume: int = 0) -> tuple[bool, int]:
        """``matches`` for a stream that grows: see ``General.scan``."""
        return self.condition.scan(stream, resume)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.filter_id,
            "kind": self.kind,
            "service_id": self.service_id.hex(),
            "service": self.service_name,
            "proto": self.proto,
            "port": self.port,
            "condition": _condition_json(self.condition),
            "words": self.condition.describe(),
        }


def _condition_json(c: Condition) -> dict[str, object]:
    if isinstance(c, Specific):
        return {"specific": {"offset": c.offset, "value": c.value.hex()}}
    d = asdict(c)
    for p in d["pins"]:
        p.pop("why", None)
    d["overflow"].pop("why", None)
    f = d["overflow"]["field"]
    # Absent when empty: a filter made before they existed keeps its id.
    for key in ("stops", "tokens"):
        if not f[key]:
            del f[key]
    if "tokens" in f:
        f["tokens"] = [t.hex() for t in f["tokens"]]
    return {"general": d}


def condition_from_json(d: dict[str, object]) -> Condition:
    """The inverse of the JSON form, strict: a stored filter that is not valid raises
    ValueError instead of becoming a filter that matches the wrong thing."""
    if not isinstance(d, dict) or len(d) != 1:
        raise ValueError("a condition is an object with one key, specific or general")
    (kind, body), = d.items()
    if not isinstance(body, dict):
        raise ValueError("a condition's body must be an object")
    if kind == "specific":
        off, val = body.get("offset"), body.get("value")
        if not _uint(off) or not isinstance(val, str):
            raise ValueError("specific: bad offset or value")
        return Specific(off, bytes.fromhex(val))  # type: ignore[arg-type]
    if kind != "general":
        raise ValueError(f"unknown condition kind {kind!r}")
    pins = []
    for p in body.get("pins", ()):  # type: ignore[union-attr]
        if not (isinstance(p, dict) and _uint(p.get("offset")) and _byte(p.get("value"))):
            raise ValueError("general: bad pin")
        pins.append(Pin(p["offset"], p["value"]))
    o = body.get("overflow")
    if not isinstance(o, dict) or o.get("kind") not in ("terminated", "length"):
        raise ValueError("general: bad overflow")
    f = o.get("field")
    if not (isinstance(f, dict) and _uint(f.get("offset"))
            and (f.get("delimiter") is None or _byte(f.get("delimiter")))
            and _uint(f.get("occurrence", 1)) and 1 <= f.get("occurrence", 1) <= 64):
        raise ValueError("general: bad field")
    stops, hexed = f.get("stops", []), f.get("tokens", [])
    if not (isinstance(stops, list) and all(_byte(b) for b in stops)):
        raise ValueError("general: bad stop bytes")
    if not (isinstance(hexed, list) and all(isinstance(t, str) for t in hexed)):
        raise ValueError("general: bad tokens")
    try:
        tokens = [bytes.fromhex(t) for t in hexed]
    except ValueError:
        raise ValueError("general: bad tokens") from None
    if any(len(t) > MAX_TOKEN for t in tokens):
        raise ValueError("general: bad tokens")
    terms = o.get("terminators", [])
    if not (isinstance(terms, list) and all(_byte(t) for t in terms)):
        raise ValueError("general: bad terminators")
    reach, size = o.get("reach"), o.get("size", 0)
    if not (_uint(reach) and 0 < reach <= MAX_REACH and _uint(size) and size <= 8):  # type: ignore[operator]
        raise ValueError("general: bad reach or size")
    return General(tuple(pins), Overflow(
        o["kind"], Field(f["offset"], f.get("delimiter"), f.get("occurrence", 1),  # type: ignore[arg-type]
                         tuple(stops), tuple(tokens)), reach,
        tuple(terms), size,
        bool(o.get("little_endian", True))), bool(body.get("sliding", False)))


def _uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_REACH


def _byte(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255
