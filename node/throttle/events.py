"""Decision events of the throttle core.

The core returns these instead of acting: an adapter turns them into kernel verdicts, nft set
changes or SMTP deliveries, and tests assert on them. ``flow`` is the adapter's own handle for
the attempt (a retained packet, a queued message); the core never looks inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class PassReason(Enum):
    WORKING_SET = "working_set"  # the destination was contacted recently
    ALLOWLIST = "allowlist"  # the operator says never delay it
    NEW = "new"  # a new destination, and a release slot was free right now


@dataclass(frozen=True, slots=True)
class Passed:
    src: Any
    dst: Any
    flow: Any
    reason: PassReason


@dataclass(frozen=True, slots=True)
class Queued:
    src: Any
    dst: Any
    flow: Any
    depth: int  # attempts waiting for this source, this one included


@dataclass(frozen=True, slots=True)
class Released:
    src: Any
    dst: Any
    flow: Any
    queued_at: float
    at: float


@dataclass(frozen=True, slots=True)
class Blocked:
    src: Any
    dst: Any
    flow: Any


@dataclass(frozen=True, slots=True)
class Flagged:
    """The source's delay queue grew past the threshold: it behaves like a worm."""

    src: Any
    depth: int
    at: float


@dataclass(frozen=True, slots=True)
class Cleared:
    """An operator cleared the infected flag."""

    src: Any


@dataclass(frozen=True, slots=True)
class WorkingSetAdded:
    src: Any
    dst: Any


@dataclass(frozen=True, slots=True)
class WorkingSetRemoved:
    src: Any
    dst: Any


Event = (Passed | Queued | Released | Blocked | Flagged | Cleared | WorkingSetAdded
         | WorkingSetRemoved)
