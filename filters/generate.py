"""Filters from a verified alert, with the sandbox as the oracle (Vigilante's filters, Bouncer's
checking of every generalisation).

The alert's execution is re-run with taint to find what the vulnerability depends on: where the
overwritten slot (or the critical argument) sits in the message, the comparisons the service
made on message bytes on its way there, and how far the vulnerable field must reach. Each step
is checked by replaying modified copies of the exploit through the verifier (fresh flash clones,
unpredictable traps): a byte is pinned only if changing it stops the exploit; a terminator is
kept only if putting it in the field stops the exploit; a field is anchored to a delimiter only
if moving the delimiter moves the field. The result is a **general filter** over the vulnerable
field (so mutated exploits are blocked too) and a **specific filter**: the exploit's exact bytes
at the alert's offsets and the ``SPECIFIC_BYTES`` before them (or from the message's start, if
that is nearer). The bytes at the offsets alone are no filter: the verifier puts its own value
there, so they are whatever the exploit's author chose, a single byte for code execution, and a
hostile peer could make them match benign requests.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from sca.alert import (
    Alert,
    ByteRef,
    FunctionArgument,
    Message,
    Messages,
    map_refs,
)
from sca.emu.image import ServiceImage
from sca.generate import Detector
from sca.taint.engine import Condition, TaintRun
from sca.verify import Verifier

from .condition import MAX_TOKEN, NEVER, Field, Filter, General, Overflow, Pin, Specific

SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
SAMPLES = 20
MOVE = 5  # bytes inserted before a delimiter to check that the field moves with it
SPECIFIC_BYTES = 32  # the least a specific filter compares: ending with the alert's offsets


class FilterGenerationError(ValueError):
    """No filter could be derived (the reason says which step failed)."""


@dataclass
class Generated:
    specific: Filter | None
    general: Filter | None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    oracle_runs: int = 0


@dataclass
class _Stream:
    """The message the vulnerability is in: a datagram, or a connection's chunks joined."""

    alert: Alert
    index: list[int]  # alert message indexes making up the stream, in order
    data: bytes

    @property
    def sliding(self) -> bool:
        # A TCP stream may carry other requests before the exploit: match at any position.
        return self.alert.messages[self.index[0]].connection is not None

    def offset(self, ref: ByteRef) -> int | None:
        pos = 0
        for i in self.index:
            if i == ref.message:
                return pos + ref.offset
            pos += len(self.alert.messages[i].data)
        return None

    def messages(self, data: bytes) -> Messages:
        """The alert's messages with this stream replaced by ``data`` (as one chunk)."""
        first = self.index[0]
        out: list[Message] = []
        for i, m in enumerate(self.alert.messages):
            if i == first:
                out.append(Message(data, m.connection))
            elif i not in self.index:
                out.append(m)
        return tuple(out)

    def ref(self, offset: int) -> ByteRef:
        """A stream offset as a reference into ``messages()``'s output."""
        return ByteRef(self.index[0], offset)


def _stream_of(alert: Alert) -> _Stream:
    refs = alert.refs()
    msg = alert.messages[refs[0].message]
    if msg.connection is None:
        idx = [refs[0].message]
    else:
        idx = [i for i, m in enumerate(alert.messages) if m.connection == msg.connection]
    return _Stream(alert, idx, b"".join(alert.messages[i].data for i in idx))


class _Oracle:
    """Does a modified copy of the exploit still reach the vulnerability? Answered by the
    verifier with the alert's own kind of trap, at the moved offsets."""

    def __init__(self, verifier: Verifier, stream: _Stream) -> None:
        self.verifier = verifier
        self.stream = stream
        self.runs = 0

    def works(self, data: bytes, shift_from: int = 1 << 30, shift: int = 0) -> bool:
        s = self.stream

        def move(r: ByteRef) -> ByteRef:
            off = s.offset(r)
            if off is None:
                return r
            return s.ref(off + shift if off >= shift_from else off)

        v = map_refs(s.alert.verification, move)
        alert = Alert(s.alert.service_id, s.alert.service_name, s.messages(data), v)
        self.runs += 1
        return self.verifier.verify(alert).verified


def _other(b: int, rng: random.Random) -> int:
    while True:
        c = rng.choice(SAFE)
        if c != b:
            return c


def _compared_offsets(stream: _Stream, conditions: Iterable[Condition]) -> dict[int, set[int]]:
    """Stream offset -> constants the service compared that byte with (``test x,x`` is 0)."""
    out: dict[int, set[int]] = {}
    for c in conditions:
        refs = [r for r in c.left if r is not None]
        if len(refs) != 1 or (len(c.left) > 1 and any(x != refs[0] for x in c.left if x)):
            continue
        off = stream.offset(refs[0])
        if off is None:
            continue
        if isinstance(c.right, int):
            out.setdefault(off, set()).add(c.right & 0xFF)
        elif c.op == "test" and c.right is not None and tuple(c.right) == tuple(c.left):
            out.setdefault(off, set()).add(0)
    return out


def _slot_offset(stream: _Stream, run: TaintRun, alert: Alert) -> int:
    """Where the overwritten slot (or the critical argument) starts in the stream."""
    d = run.detection
    refs: list[ByteRef] = []
    if d is not None and d.site is not None:
        refs = [r for r in run.labels_at(d.site, 8) if r is not None]
    if not refs or isinstance(alert.verification, FunctionArgument):
        refs = list(alert.refs())
    offs = [o for o in (stream.offset(r) for r in refs) if o is not None]
    if not offs:
        raise FilterGenerationError("the overwritten bytes are not in the exploit's stream")
    return min(offs)


def specific_filter(alert: Alert, image: ServiceImage, benign: Iterable[Message] = ()) -> Filter:
    """The specific filter alone (the exploit's bytes at the alert's offsets): no sandbox work,
    so a node can install it at once and the general one when it is ready.
    ``FilterGenerationError`` when it matches the service's benign request (the manifest's
    ``warmup``) or a message of ``benign``: a verified alert can still be made to do that."""
    f = _specific(alert, image, _stream_of(alert))
    known = [image.warmup] if image.warmup else []
    if any(f.matches(m) for m in known + [m.data for m in benign]):
        raise FilterGenerationError("the specific filter matches a benign request")
    return f


def _specific(alert: Alert, image: ServiceImage, stream: _Stream) -> Filter:
    offs = sorted(o for o in (stream.offset(r) for r in alert.refs()) if o is not None)
    lo, end = offs[0], offs[-1] + 1
    # The bytes that led up to the offsets, and all of the offsets; from the start of a short
    # message on, its first SPECIFIC_BYTES (or all of it).
    lo = max(0, min(lo, end - SPECIFIC_BYTES))
    end = max(end, min(len(stream.data), lo + SPECIFIC_BYTES))
    return Filter(alert.service_id, image.name, image.proto, image.port,  # type: ignore[arg-type]
                  Specific(lo, stream.data[lo:end]))


def generate_filters(alert: Alert, image: ServiceImage, *, detector: Detector | None = None,
                     verifier: Verifier | None = None, benign: Iterable[Message] = (),
                     seed: int = 0) -> Generated:
    """Both filters for a verified ``alert`` of ``image``. ``benign`` (optional) is a corpus the
    general filter must not match; a relaxation that would match it is not taken."""
    start = time.perf_counter()
    benign = list(benign)
    if alert.service_id != image.service_id:
        raise FilterGenerationError("the alert is for another service")
    verifier = verifier or Verifier([image])
    detector = detector or Detector(image)
    rng = random.Random(seed)
    stream = _stream_of(alert)
    oracle = _Oracle(verifier, stream)
    if not oracle.works(stream.data):
        raise FilterGenerationError("the alert does not verify")
    run = detector.inspect(alert.messages)
    if run.detection is None:
        raise FilterGenerationError("the tainted re-run caught no exploit")
    notes: list[str] = []
    try:
        specific: Filter | None = specific_filter(alert, image, benign)
    except FilterGenerationError as e:
        specific = None
        notes.append(f"no specific filter: {e}")
    slot = _slot_offset(stream, run, alert)
    compared = _compared_offsets(stream, run.conditions)
    corpus = [m.data for m in benign] + ([image.warmup] if image.warmup else [])
    general = (_terminated(stream, slot, compared, _header_offsets(run, stream, slot), oracle,
                           rng, notes, corpus, image.binary)
               or _length(stream, run, slot, oracle, rng, notes))
    result = None
    if general is not None and not general.matches(stream.data):
        notes.append("general filter dropped: it does not match the exploit")
    elif general is not None:
        benign_hits = [m for m in corpus if general.matches(m)]
        if benign_hits:
            notes.append(f"general filter dropped: it matches {len(benign_hits)} benign "
                         "message(s)")
        else:
            result = Filter(alert.service_id, image.name, image.proto, image.port,  # type: ignore[arg-type]
                            general)
    else:
        notes.append("no general filter: the vulnerable field could not be delimited")
    return Generated(specific, result, notes, time.perf_counter() - start, oracle.runs)


def _field_start(stream: _Stream, slot: int, oracle: _Oracle, rng: random.Random) -> int:
    """Scan back from the slot: the field starts after the last byte whose change stops the
    exploit."""
    data = stream.data
    for i in range(slot - 1, -1, -1):
        patched = bytearray(data)
        patched[i] = _other(data[i], rng)
        if not oracle.works(bytes(patched)):
            return i + 1
    return 0


def _pins(stream: _Stream, upto: int, compared: dict[int, set[int]], oracle: _Oracle,
          rng: random.Random, skip: Iterable[int] = ()) -> list[Pin]:
    pins = []
    skipped = set(skip)
    for off in sorted(o for o in compared if o < upto and o not in skipped):
        patched = bytearray(stream.data)
        patched[off] = _other(stream.data[off], rng)
        if not oracle.works(bytes(patched)):
            pins.append(Pin(off, stream.data[off], "changing it stops the exploit"))
    return pins


def _terminated(stream: _Stream, slot: int, compared: dict[int, set[int]],
                words: dict[int, set[int]], oracle: _Oracle, rng: random.Random,
                notes: list[str], benign: list[bytes], binary: bytes) -> General | None:
    """``compared``: offsets the service compared alone (pin candidates, and where a field's
    delimiter is looked for from); ``words``: every offset it compared, words included
    (strcmp and kin compare several bytes at once: a method, a command name), pinned where
    they come before the field and any token that may take other values."""
    data = stream.data
    start = _field_start(stream, slot, oracle, rng)
    reach = slot - start
    if reach <= 0:
        return None
    # Every byte value is a candidate: string routines compare vector-wide, so the recorded
    # conditions do not name every terminator; the replay decides.
    mid = start + reach // 2
    terminators = []
    for t in range(256):
        patched = bytearray(data)
        patched[mid] = t
        if data[mid] != t and not oracle.works(bytes(patched)):
            terminators.append(t)
    if not terminators:
        return None  # nothing in the field stops the copy: not a terminator-driven copy
    notes.append(f"field {start}..{slot - 1} ({reach} bytes) is copied up to the slot; "
                 f"terminators confirmed by replay: {', '.join(hex(t) for t in terminators)}")
    fld = Field(start)
    delim = data[start - 1] if start > 0 else None
    pins = _pins(stream, start - 1 if delim is not None else start, compared, oracle, rng)
    before = start - 1 if delim is not None else start  # where word pins may be
    # Anchor the field on its delimiter if the delimiter is scanned for (compared at several
    # earlier offsets) and the exploit still works with the field moved.
    if delim is not None and delim not in SAFE:
        scan_from = max((p.offset + 1 for p in pins), default=0)
        nth = data.count(bytes([delim]), scan_from, start)
        previous = data.rfind(bytes([delim]), scan_from, start - 1)
        # Lengthen the token before the delimiter, at its end or at its start: if the exploit
        # still works, the field's position is not what matters, its delimiter is.
        token_at = previous + 1 if previous >= 0 else scan_from
        own = data[token_at:start - 1]
        alts = _benign_tokens(benign, scan_from, delim, nth, own)
        alts += [w for w in _neighbour_words(binary, own) if w not in alts]
        tokens = {own}  # the tokens before the delimiter that keep the exploit working
        free_at: int | None = None  # where filler may go: then any token does
        anchored = False
        refused: set[bytes] = set()  # replayed already, in vain
        for moved, at, shift, token in _moves(data, token_at, start - 1, alts, rng):
            if not oracle.works(moved, shift_from=at, shift=shift):
                if token is not None:
                    refused.add(token)
                continue
            if not anchored:
                notes.append(f"the field follows delimiter {delim:#04x} number {nth} after "
                             f"offset {scan_from}: moving it by {shift} bytes keeps the exploit "
                             "working")
            anchored = True
            if token is None:
                free_at = at
                break
            tokens.add(token)
        if anchored:
            before = token_at
        if free_at is not None:
            # The bytes that, put before the delimiter, stop the exploit: the delimiter is
            # looked for only up to them (the end of a request line, say).
            fld = Field(scan_from, delim, nth,
                        _stops(data, free_at, delim, data[scan_from:start - 1], oracle))
            if fld.stops:
                notes.append("the delimiter counts only before any of "
                             f"{', '.join(hex(b) for b in fld.stops)}: put before it, each "
                             "stops the exploit")
        elif anchored and len(own) <= MAX_TOKEN:
            # The other candidates, replayed (those as long as the exploit's own proved
            # nothing about the field's place, but may be other commands that reach it).
            tokens.update(t for t in alts if t not in tokens and t not in refused and oracle.works(
                data[:token_at] + t + data[start - 1:], shift_from=start - 1,
                shift=len(t) - len(own)))
            fld = Field(scan_from, delim, nth, tokens=tuple(sorted(tokens)))
            notes.append("only these tokens before the delimiter keep the exploit working: "
                         f"{', '.join(repr(t) for t in fld.tokens)}")
        else:
            pins.append(Pin(start - 1, delim, "the field does not move with it"))
    elif delim is not None:
        patched = bytearray(data)
        patched[start - 1] = _other(delim, rng)
        if not oracle.works(bytes(patched)):
            pins.append(Pin(start - 1, delim, "changing it stops the exploit"))
    pins += _pins(stream, before, words, oracle, rng, skip=[p.offset for p in pins])
    general = General(tuple(sorted(pins, key=lambda p: p.offset)),
                      Overflow("terminated", fld, reach, tuple(terminators),
                               why="every terminator confirmed by replay"),
                      sliding=stream.sliding)
    _check_samples(general, stream, oracle, rng, notes)
    return general


def _stops(data: bytes, at: int, delim: int, scanned: bytes, oracle: _Oracle
           ) -> tuple[int, ...]:
    """Bytes that, inserted at ``at`` (where filler keeps the exploit working), stop it; none
    the exploit itself has where the delimiter is looked for (``scanned``): it works with them
    there, and they end the search anywhere in it."""
    return tuple(b for b in range(256) if b != delim and b not in SAFE and b not in scanned
                 and not oracle.works(data[:at] + bytes((b,)) + data[at:], shift_from=at,
                                      shift=1))


def _benign_tokens(benign: list[bytes], scan_from: int, delim: int, nth: int, own: bytes
                   ) -> list[bytes]:
    """The tokens benign messages have before the same delimiter (at most 8 others)."""
    out: list[bytes] = []
    sep = bytes([delim])
    for b in benign:
        parts = b[scan_from:].split(sep)
        if len(parts) <= nth:
            continue
        alt = parts[nth - 1]
        if alt and alt != own and alt not in out and len(alt) <= MAX_TOKEN:
            out.append(alt)
            if len(out) == 8:
                break
    return out


def _neighbour_words(binary: bytes, own: bytes, reach: int = 256, most: int = 32
                     ) -> list[bytes]:
    """Words stored near the exploit's token in the service's binary, nearest first: a
    command table's other names are candidates for the tokens that reach the vulnerability
    too (each is replayed before it counts)."""
    m = re.search(rb"(?<![\w.-])" + re.escape(own) + rb"(?![\w.-])", binary)
    if m is None or not re.fullmatch(rb"[\w.-]+", own):
        return []
    lo = max(0, m.start() - reach)
    near = ((abs(w.start() + lo - m.start()), w.group())
            for w in re.finditer(rb"[\w.-]{1,%d}" % MAX_TOKEN, binary[lo:m.end() + reach]))
    return list(dict.fromkeys(w for _, w in sorted(near) if w != own))[:most]


def _moves(data: bytes, token_at: int, delim_at: int, alts: list[bytes], rng: random.Random
           ) -> Iterable[tuple[bytes, int, int, bytes | None]]:
    """Copies of the exploit with the token before the delimiter longer or shorter: filler at
    its end or its start (token None), then the benign tokens ``alts`` of another length (a
    service may accept only some tokens there, such as command names)."""
    for at in dict.fromkeys((delim_at, token_at)):
        filler = bytes(rng.choice(SAFE) for _ in range(MOVE))
        yield data[:at] + filler + data[at:], at, MOVE, None
    old = data[token_at:delim_at]
    for alt in alts:
        if len(alt) != len(old):
            yield data[:token_at] + alt + data[delim_at:], delim_at, len(alt) - len(old), alt


def _length(stream: _Stream, run: TaintRun, slot: int, oracle: _Oracle, rng: random.Random,
            notes: list[str]) -> General | None:
    """A length-driven copy: a multi-byte field compared by the service whose value, lowered
    below the distance to the slot, stops the exploit."""
    data = stream.data
    seen: set[tuple[int, int]] = set()
    for c in run.conditions:
        refs = [r for r in c.left if r is not None]
        offs = sorted({o for o in (stream.offset(r) for r in refs) if o is not None})
        if len(offs) not in (2, 4) or offs[-1] - offs[0] != len(offs) - 1 or offs[-1] >= slot:
            continue
        off, size = offs[0], len(offs)
        if (off, size) in seen:
            continue
        seen.add((off, size))
        for little in (True, False):
            value = int.from_bytes(data[off:off + size], "little" if little else "big")
            payload = len(data) - value  # the copy's source: the rest of the message
            if not 0 < payload <= slot:
                continue
            reach = slot - payload + 1
            shorter = bytearray(data)
            shorter[off:off + size] = (reach - 1).to_bytes(size, "little" if little else "big")
            if oracle.works(bytes(shorter)):
                continue  # the exploit does not need this length: not the copy's length
            pins = _pins(stream, off, _header_offsets(run, stream, off), oracle, rng)
            notes.append(f"a {size}-byte {'little' if little else 'big'}-endian length at "
                         f"{off} drives the copy from offset {payload}; {reach} reaches the slot")
            general = General(tuple(pins), Overflow(
                "length", Field(off), reach, size=size, little_endian=little,
                why="a smaller length stops the exploit"), sliding=stream.sliding)
            _check_samples(general, stream, oracle, rng, notes)
            return general
    return None


def _header_offsets(run: TaintRun, stream: _Stream, upto: int) -> dict[int, set[int]]:
    """Offsets before ``upto`` the service compared (single or multi-byte): pin candidates."""
    out: dict[int, set[int]] = {}
    for c in run.conditions:
        for r in c.left:
            off = stream.offset(r) if r is not None else None
            if off is not None and off < upto:
                out.setdefault(off, set())
    return out


def _check_samples(general: General, stream: _Stream, oracle: _Oracle, rng: random.Random,
                   notes: list[str]) -> None:
    """Bouncer's check: messages that satisfy the condition with the field's filler redrawn
    still reach the vulnerability."""
    o = general.overflow
    data = stream.data
    start = o.field.start(data)
    if start is None or start == NEVER or o.kind != "terminated":
        return  # generate_filters drops a filter that does not match its own exploit
    ok = 0
    for _ in range(SAMPLES):
        patched = bytearray(data)
        for i in range(start, start + o.reach):
            c = rng.choice(SAFE)
            while c in o.terminators:
                c = rng.choice(SAFE)
            patched[i] = c
        assert general.matches(bytes(patched))
        ok += oracle.works(bytes(patched))
    notes.append(f"{ok}/{SAMPLES} samples with the field's bytes redrawn still exploit")
    if ok < SAMPLES:
        raise FilterGenerationError("relaxed condition admits messages that do not exploit")
