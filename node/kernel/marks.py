"""Packet marks and NFQUEUE numbers: the one place that defines them.

herdwall owns the four mark bits under ``MASK`` and leaves the other 28 to other software
(every match and every set in ``node.kernel.nft`` is masked). The values are exclusive
categories, not flags: the last rule of ``inet herdwall`` that sets one wins.

- ``PASS``: never queued, never throttled. The node's own sockets carry it (``SO_MARK``, see
  ``node.kernel.sockets``); ``inet herdwall`` copies it into the conntrack mark so the replies
  of those connections pass too; the throttle gives it to working-set (source, destination)
  pairs through an nft set.
- ``QUEUE_STACK``: to NFQUEUE ``Q_STACK``, read by the user-level stack (traffic of protected
  services, both directions).
- ``QUEUE_THROTTLE``: to NFQUEUE ``Q_THROTTLE``, read by the throttle (new outgoing flows).
- ``QUEUE_TRACE``: to NFQUEUE ``Q_TRACE``, read by the traceback router role (forwarded
  packets: digests logged, ids marked).
- ``QUEUE_TAKEOVER``: to NFQUEUE ``Q_TAKEOVERS`` (one per CPU), ``QUEUE_TAKEN`` to
  ``Q_TAKEOVER``, read by the takeover (``node.takeover``);
  ``TAKEOVER_OWN`` and ``REPAIR_LOCAL`` are its own sockets' and its baseline's marks.
"""

from __future__ import annotations

import os

MASK = 0x000F0000
PASS = 0x00010000
QUEUE_STACK = 0x00020000
QUEUE_THROTTLE = 0x00030000
QUEUE_TRACE = 0x00040000  # forwarded packets to the traceback router role
QUEUE_TAKEOVER = 0x00050000  # packets of watched and taken-over flows
TAKEOVER_OWN = 0x00060000  # SO_MARK of the takeover's own sockets (raw, repaired)
REPAIR_LOCAL = 0x00070000  # the TCP_REPAIR baseline's redirect to a local socket
QUEUE_TAKEN = 0x00080000  # packets of taken-over flows: to Q_TAKEOVER alone, in order

Q_STACK = 0
Q_THROTTLE = 1
Q_TRACE = 2
Q_TAKEOVER = 3  # the first of TAKEOVER_READERS queues (3-10 at most): one per CPU
# The takeover queue is fanned out by CPU (``--queue-balance`` with ``--queue-cpu-fanout``): a
# watched flow's packet goes to the queue of the CPU that handled it, whose reader thread is
# pinned there, so it is woken on that CPU instead of by an interrupt to another
# (node.takeover.adapter). A taken-over flow's packets (QUEUE_TAKEN) all go to the first: a
# sender that moves between CPUs would otherwise have its segments read out of order.
# A watched flow whose local sender moves between CPUs (veth, containers) is read out of
# order across the queues; the takeover queue holds such client segments for their turn
# (node.takeover.adapter), so a 20 MB upload loses none (it lost 609-2297 when they were
# dropped). One per CPU, at most 8.
TAKEOVER_READERS = max(1, min(os.cpu_count() or 1, 8))
Q_TAKEOVERS = (Q_TAKEOVER, Q_TAKEOVER + TAKEOVER_READERS - 1)  # the rule's range

# Mark value -> queue number (or first and last of a fanned-out range): what
# node.kernel.queue_rules installs by default.
QUEUES: dict[int, int | tuple[int, int]] = {QUEUE_STACK: Q_STACK, QUEUE_THROTTLE: Q_THROTTLE}
# Every queue any part of herdwall may install a rule for (the takeover and traceback
# components add theirs): what `herdwall node teardown` removes.
ALL_QUEUES: dict[int, int | tuple[int, int]] = {**QUEUES, QUEUE_TRACE: Q_TRACE,
                                                 QUEUE_TAKEOVER: Q_TAKEOVERS,
                                                 QUEUE_TAKEN: Q_TAKEOVER}


def with_mark(current: int, value: int) -> int:
    """``current`` with herdwall's bits replaced by ``value`` (a verdict mark that keeps other
    software's bits)."""
    return (current & ~MASK & 0xFFFFFFFF) | (value & MASK)
