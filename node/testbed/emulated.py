"""The sample service in the emulator, one flash clone per datagram, for the worm harness
(``node.testbed.worm``): replies for benign datagrams, and whether a datagram hijacked it.

The service never runs natively: only in herdwall's sandbox (``sca.emu``), with budgets far
below the sandbox defaults (a datagram takes a few thousand instructions).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

SERVICE = "resolver"
MAX_DATAGRAM = 65535
VERDICT_CACHE = 4096


@dataclass(frozen=True)
class Verdict:
    """What one datagram did to the emulated service."""

    replies: tuple[bytes, ...]
    hijacked: bool
    outcome: str  # the sandbox outcome of the plain run
    detail: str = ""
    ms: float = 0.0


class EmulatedService:
    """The sample service in flash clones, one datagram per fresh clone (the resolver keeps no
    state between datagrams, so a clone per datagram is what the real service would see).

    ``confirm="auto"``: a plain run first (about 0.3 ms); only a run that does not end waiting
    for the next datagram (the service exited, crashed, ran out of budget) is replayed with
    taint to tell a hijack from a crash. ``"always"``: every datagram is replayed with taint
    (slower; the strictest ground truth). Verdicts of taint replays are cached by the
    datagram's digest: the emulation is deterministic, and a worm sends one datagram over and
    over."""

    def __init__(self, service: str = SERVICE, confirm: str = "auto") -> None:
        from sca.emu.sandbox import Budget, open_sandbox
        from sca.services import manifest_path
        from sca.taint.engine import TaintTracker

        if confirm not in ("auto", "always"):
            raise ValueError("confirm is 'auto' or 'always'")
        self.confirm = confirm
        # Budgets far below the sandbox defaults: a datagram takes a few thousand instructions.
        budget = Budget(instructions=2_000_000, wall_ms=500)
        self.plain = open_sandbox(manifest_path(service), budget)
        self.taint = TaintTracker(open_sandbox(manifest_path(service), budget))
        self._cache: OrderedDict[bytes, tuple[bool, str]] = OrderedDict()
        self.runs = 0
        self.taint_runs = 0

    def handle(self, datagram: bytes) -> Verdict:
        from sca.alert import Message
        from sca.emu.sandbox import Outcome

        start = time.perf_counter()
        msgs = [Message(datagram[:MAX_DATAGRAM])]
        result = self.plain.run(msgs)
        self.runs += 1
        replies = tuple(data for _dest, data in result.sent)
        if result.outcome == Outcome.BLOCKED and self.confirm == "auto":
            return Verdict(replies, False, str(result.outcome),
                           ms=(time.perf_counter() - start) * 1e3)
        hijacked, detail = self._taint(datagram, msgs)
        return Verdict(replies, hijacked, str(result.outcome), detail or result.fault,
                       (time.perf_counter() - start) * 1e3)

    def _taint(self, datagram: bytes, msgs: list[Any]) -> tuple[bool, str]:
        key = hashlib.sha256(datagram).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        run = self.taint.run(msgs)
        self.taint_runs += 1
        det = run.detection
        verdict = (det is not None, f"{det.detail} at {det.pc:#x}" if det else "")
        self._cache[key] = verdict
        if len(self._cache) > VERDICT_CACHE:
            self._cache.popitem(last=False)
        return verdict
