"""Anti-entropy, sans-I/O: now and then tell a random neighbour which alerts we hold.

Every ``interval`` seconds (jittered by ±25% so a network of nodes started together does not
tick in step) a node sends one neighbour a digest of the ids it verified in the last
``window`` seconds, newest first, at most 16 (one small datagram). The neighbour fetches what it
lacks from the sender, like an announcement with no range (it does not forward it: the tree did
or did not do that; the misses of others are repaired by their own exchanges), and answers with
a digest of what the sender lacks. So a node that missed a broadcast (a subtree lost with a
dead or lying relay, a dropped datagram) gets it within a few intervals.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from overlay.wire import MAX_IHAVE_IDS

T = TypeVar("T")


class AntiEntropy:
    def __init__(self, interval: float, window: float, rng: random.Random, now: float) -> None:
        if interval <= 0 or window <= 0:
            raise ValueError("interval and window must be positive")
        self.interval = interval
        self.window = window
        self.rng = rng
        self.next_at = now + self._jittered()
        self.rounds = 0

    def _jittered(self) -> float:
        return self.interval * self.rng.uniform(0.75, 1.25)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def start_round(self, now: float, peers: Sequence[T]) -> T | None:
        """Schedule the next round and pick this round's neighbour (None without any)."""
        self.next_at = now + self._jittered()
        if not peers:
            return None
        self.rounds += 1
        return peers[self.rng.randrange(len(peers))]

    @staticmethod
    def lacking(theirs: Sequence[bytes], ours: Sequence[bytes]) -> tuple[bytes, ...]:
        """Our ids (newest first) that are not in their digest, at most one digest's worth."""
        have = set(theirs)
        return tuple(i for i in ours if i not in have)[:MAX_IHAVE_IDS]
