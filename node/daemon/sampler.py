"""The detector's bounded queue and its sampling policy under load (sans-I/O).

Taint replay costs milliseconds to a second per submission; traffic can offer far more than the
pool can replay. The queue holds at most ``capacity`` submissions, and the policy decides which:

- **Fair across services.** Submissions wait in one FIFO per service, taken round-robin, so a
  flood aimed at one service neither delays nor crowds out the others: when the queue is full,
  a newcomer of a service below its fair share (capacity / services waiting) takes the slot of
  a random submission of the longest queue.
- **Uniform within a service.** When a service's queue is at its share, a newcomer replaces a
  random waiting submission with probability share / offered (Vitter's algorithm R over the
  submissions offered since that queue last ran dry): every submission of a flood has the same
  chance to be replayed, so an exploit cannot be hidden by sending it first and burying it,
  or last and be sure it is dropped.
- **No replay twice.** Identical submissions (same service and bytes) waiting or recently
  replayed are dropped as duplicates: a worm repeats its exploit verbatim.
- **A connection once.** A connection's submission is its history so far; a longer history of
  the same connection takes the waiting one's place (its queue position and its sampling
  draw), so a connection of n chunks under load is not replayed n times, each from the start.

Nothing here reads a clock or does I/O; the random source is injected.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sca.alert import Message

QUEUED = "queued"
REPLACED = "replaced"  # queued in place of an older submission
SUPERSEDED = "superseded"  # took the place of the same connection's shorter history
SAMPLED_OUT = "sampled-out"
DUPLICATE = "duplicate"


@dataclass(eq=False)
class Job:
    service: str
    messages: tuple[Message, ...]
    packets: tuple[tuple[bytes, ...], ...] = ()
    submitted: float = 0.0
    flow: object = None  # the connection whose history this is (None: a datagram)
    digest: bytes = field(default=b"", init=False)

    def extends(self, other: Job) -> bool:
        """More of the same connection's history: a replay of this covers ``other``'s (one
        whose oldest chunks were cut does not)."""
        return (self.flow is not None and self.flow == other.flow
                and self.service == other.service
                and self.messages[:len(other.messages)] == other.messages)

    def __post_init__(self) -> None:
        h = hashlib.sha256(self.service.encode() + b"\0")
        for m in self.messages:
            h.update(b"%d:%d:" % (-1 if m.connection is None else m.connection, len(m.data)))
            h.update(m.data)
        self.digest = h.digest()


@dataclass
class SamplerStats:
    offered: int = 0
    queued: int = 0
    replaced: int = 0
    superseded: int = 0
    sampled_out: int = 0
    duplicates: int = 0
    taken: int = 0


class Sampler:
    def __init__(self, capacity: int, *, rng: random.Random | None = None,
                 remember: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.rng = rng or random.Random()
        self.stats = SamplerStats()
        self._queues: dict[str, deque[Job]] = {}
        self._offered_since_dry: dict[str, int] = {}
        self._order: deque[str] = deque()  # round-robin order of services with work
        self._waiting: dict[bytes, int] = {}  # digest -> count waiting
        self._flows: dict[object, Job] = {}  # (service, flow) -> its job waiting
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._remember = remember
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def depth(self) -> dict[str, int]:
        return {s: len(q) for s, q in self._queues.items() if q}

    def _share(self, service: str) -> int:
        active = sum(1 for q in self._queues.values() if q)
        if not self._queues.get(service):
            active += 1
        return max(1, self.capacity // max(1, active))

    def _push(self, job: Job) -> None:
        q = self._queues.setdefault(job.service, deque())
        if not q:
            self._order.append(job.service)
        q.append(job)
        self._size += 1
        self._hold(job)

    def _hold(self, job: Job) -> None:
        self._waiting[job.digest] = self._waiting.get(job.digest, 0) + 1
        if job.flow is not None:
            self._flows[(job.service, job.flow)] = job

    def _release(self, job: Job) -> None:
        n = self._waiting[job.digest] - 1
        if n:
            self._waiting[job.digest] = n
        else:
            del self._waiting[job.digest]
        if job.flow is not None and self._flows.get((job.service, job.flow)) is job:
            del self._flows[(job.service, job.flow)]

    def _evict(self, service: str, index: int) -> Job:
        q = self._queues[service]
        q.rotate(-index)
        old = q.popleft()
        q.rotate(index)
        self._size -= 1
        self._release(old)
        if not q:
            self._order.remove(service)
        return old

    def offer(self, job: Job) -> str:
        """Queue ``job`` or not; returns what happened (``QUEUED``, ``REPLACED``,
        ``SUPERSEDED``, ``SAMPLED_OUT`` or ``DUPLICATE``)."""
        self.stats.offered += 1
        if job.digest in self._waiting or job.digest in self._recent:
            self.stats.duplicates += 1
            return DUPLICATE
        s = job.service
        q = self._queues.get(s)
        older = self._flows.get((s, job.flow)) if job.flow is not None else None
        if older is not None and job.extends(older):
            assert q is not None
            q[q.index(older)] = job
            self._release(older)
            self._hold(job)
            self.stats.superseded += 1
            return SUPERSEDED
        seen = self._offered_since_dry.get(s, 0) + 1 if q else 1
        self._offered_since_dry[s] = seen
        if self._size < self.capacity:
            self._push(job)
            self.stats.queued += 1
            return QUEUED
        share = self._share(s)
        mine = len(q) if q else 0
        if mine < share:
            # Below its fair share: take a random slot of the longest queue.
            longest = max(self._queues, key=lambda k: len(self._queues[k]))
            self._evict(longest, self.rng.randrange(len(self._queues[longest])))
            self._push(job)
            self.stats.replaced += 1
            return REPLACED
        # At its share: algorithm R over the submissions offered since the queue ran dry.
        r = self.rng.randrange(seen)
        if r < mine:
            self._evict(s, r)
            self._push(job)
            self.stats.replaced += 1
            return REPLACED
        self.stats.sampled_out += 1
        return SAMPLED_OUT

    def take(self) -> Job | None:
        """The next job, round-robin across services (FIFO within one)."""
        if not self._order:
            return None
        s = self._order.popleft()
        q = self._queues[s]
        job = q.popleft()
        self._size -= 1
        self._release(job)
        if q:
            self._order.append(s)
        else:
            self._offered_since_dry[s] = 0
        self._remember_digest(job.digest)
        self.stats.taken += 1
        return job

    def _remember_digest(self, digest: bytes) -> None:
        self._recent[digest] = None
        self._recent.move_to_end(digest)
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def forget(self, digests: Sequence[bytes]) -> None:
        """Allow these submissions to be replayed again (their replay failed, not refuted)."""
        for d in digests:
            self._recent.pop(d, None)
