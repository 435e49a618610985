"""Williamson's virus throttle: a sans-I/O core (``core``), its kernel adapter (``kernel``) for
TCP SYNs and new UDP flows, and the e-mail throttle (``smtp``) on SMTP recipients."""

from node.throttle.core import ThrottleConfig, ThrottleCore
from node.throttle.events import (
    Blocked,
    Cleared,
    Event,
    Flagged,
    Passed,
    PassReason,
    Queued,
    Released,
    WorkingSetAdded,
    WorkingSetRemoved,
)

__all__ = [
    "Blocked",
    "Cleared",
    "Event",
    "Flagged",
    "PassReason",
    "Passed",
    "Queued",
    "Released",
    "ThrottleConfig",
    "ThrottleCore",
    "WorkingSetAdded",
    "WorkingSetRemoved",
]
