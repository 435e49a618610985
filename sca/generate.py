"""Alert generation: from a detection to the smallest alert that verifies.

The detector replays what a service received (a bounded log of recent messages) with taint; on
detection we build candidate alerts, smallest first (only the messages the exploit needs, then
longer prefixes of the log; for execution-control the longest run of target bytes first, then
shorter ones, since a copy's terminator may be among the tainted bytes), verify each locally and
emit the first that verifies. Candidates carry nothing but the service, the messages and the
offsets, so two detectors catching the same exploit write the same alert.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from sca.alert import (
    MAX_MESSAGES,
    MAX_TOTAL_BYTES,
    Alert,
    ByteRef,
    ExecutionControl,
    Message,
    Messages,
    Verification,
    map_refs,
    verification_refs,
)
from sca.emu.image import ServiceImage
from sca.emu.sandbox import Budget, Sandbox
from sca.taint.engine import Detection, TaintRun, TaintTracker
from sca.verify import Verdict, Verifier


class MessageLog:
    """The recent messages a service received, bounded in count and bytes (oldest out)."""

    def __init__(self, max_messages: int = 64, max_bytes: int = 256 * 1024) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[Message] = deque()
        self._bytes = 0

    def add(self, message: Message) -> None:
        self._items.append(message)
        self._bytes += len(message.data)
        items = self._items
        while items and (len(items) > self.max_messages or self._bytes > self.max_bytes):
            self._bytes -= len(items.popleft().data)

    def messages(self) -> Messages:
        return tuple(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class Generated:
    alert: Alert
    verdict: Verdict
    tried: int


class Detector:
    """Taint replay for one service, and alert generation on detection."""

    def __init__(self, image: ServiceImage, budget: Budget | None = None) -> None:
        self.image = image
        self.tracker = TaintTracker(Sandbox(image, budget))

    def inspect(self, messages: Iterable[Message], *, conditions: bool = True) -> TaintRun:
        return self.tracker.run(messages, conditions=conditions)

    def generate(self, messages: Messages, detection: Detection,
                 verifier: Verifier) -> Generated | None:
        tried = 0
        for msgs, v in candidates(messages, detection.verification):
            if len(msgs) > MAX_MESSAGES or sum(len(m.data) for m in msgs) > MAX_TOTAL_BYTES:
                continue
            alert = Alert(self.image.service_id, self.image.name, msgs, v)
            tried += 1
            verdict = verifier.verify(alert)
            if verdict.verified:
                return Generated(alert, verdict, tried)
        return None


def _subsets(messages: Messages, used: set[int]) -> Iterator[list[int]]:
    """Message index lists to try, smallest first."""
    last = max(used)
    seen: list[list[int]] = []
    if messages[0].connection is None:
        seen.append(sorted(used))
    else:
        # A connection's chunks up to the last one used: the stream before it shapes its state;
        # then all of those connections' chunks (the request may end in a later send).
        conns = {messages[i].connection for i in used}
        upto = {c: max(i for i in used if messages[i].connection == c) for c in conns}
        seen.append([i for i, m in enumerate(messages) if m.connection in conns
                     and i <= upto[m.connection]])
        seen.append([i for i, m in enumerate(messages) if m.connection in conns])
    seen.append(list(range(last + 1)))
    seen.append(list(range(len(messages))))
    out: list[list[int]] = []
    for s in seen:
        if s not in out:
            out.append(s)
            yield s


def _remap(messages: Messages, keep: list[int], join: bool
           ) -> tuple[Messages, Callable[[ByteRef], ByteRef]]:
    """The kept messages, connections renumbered in order of first use; with ``join`` each
    connection's chunks become one (a trap that straddles two sends then fits)."""
    conn_map: dict[int, int] = {}
    out: list[Message] = []
    where: dict[int, tuple[int, int]] = {}  # old index -> (new index, offset shift)
    for i in keep:
        m = messages[i]
        if m.connection is not None:
            m = replace(m, connection=conn_map.setdefault(m.connection, len(conn_map)))
            if join:
                j = next((k for k, o in enumerate(out) if o.connection == m.connection), None)
                if j is not None:
                    where[i] = (j, len(out[j].data))
                    out[j] = Message(out[j].data + m.data, m.connection)
                    continue
        where[i] = (len(out), 0)
        out.append(m)

    def move(r: ByteRef) -> ByteRef:
        new, shift = where[r.message]
        return ByteRef(new, r.offset + shift)

    return tuple(out), move


def _verification_variants(v: Verification) -> Iterator[Verification]:
    if isinstance(v, ExecutionControl):
        for k in range(len(v.target), 0, -1):
            yield ExecutionControl(v.target[:k])
    else:
        yield v


def candidates(messages: Messages, v: Verification) -> Iterator[tuple[Messages, Verification]]:
    refs = verification_refs(v)
    used = {r.message for r in refs}
    tcp = messages[0].connection is not None
    for keep in _subsets(messages, used):
        for join in (False, True) if tcp else (False,):
            msgs, move = _remap(messages, keep, join)
            if join and len(msgs) == len(keep):
                continue  # nothing to join
            for variant in _verification_variants(v):
                yield msgs, map_refs(variant, move)
