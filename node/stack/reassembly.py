"""One direction of a TCP connection reassembled the way the receiving Linux host delivers it.

Linux's rule for overlapping data, read from ``tcp_data_queue``, ``tcp_data_queue_ofo`` and
``tcp_ofo_queue`` (net/ipv4/tcp_input.c) and checked against a real receiver in
``tests/node/stack/test_reassembly_netns.py``:

1. Bytes below ``rcv_nxt`` (already in order, queued or read) never change: a retransmission or
   an overlap that reaches back into them is cut at ``rcv_nxt``; only its bytes past ``rcv_nxt``
   count. So for delivered data **the first bytes received win**.
2. Out-of-order segments are held in a tree ordered by starting sequence number. A new segment
   wholly inside a held one that starts at or before it is dropped; one that starts at the same
   number and is longer replaces it; held segments wholly inside a new one that starts earlier
   are dropped; partial overlaps keep both. When the hole fills, held segments are delivered in
   order of their start and each byte already delivered is skipped. Together: **among held
   segments, a byte comes from the segment with the lowest starting sequence number that covers
   it; at equal starts, the longer one; at equal starts and lengths, the first received.** So a
   later segment can override earlier-received held bytes when it starts lower, which is what
   a "first segment wins" or "last segment wins" reassembler would get wrong.

The receiving kernel drops, and this class must therefore refuse, segments it would not accept
for other reasons (bad checksum, outside the receive window, PAWS); the stack checks those before
calling :meth:`Reassembler.add`. Held bytes are bounded: a segment that would go past the bound
is refused with ``FULL`` and the inline adapter drops the packet, so the receiver does not get
it either and both views stay the same (the sender retransmits later).

Sequence numbers wrap at 2**32; internally every position is an unwrapped offset from the
stream's first byte.
"""

from __future__ import annotations

from bisect import insort

# Results of Reassembler.add.
IN_ORDER = 0  # new bytes delivered (returned)
HELD = 1  # out of order, kept until the hole fills
DUPLICATE = 2  # nothing new: all bytes already delivered or already held (receiver ignores too)
FULL = 3  # refused: held bytes would exceed the bound (drop the packet inline)
BEYOND = 4  # refused: starts too far ahead of rcv_nxt to be real (drop the packet inline)

MOD = 1 << 32
HALF = 1 << 31


class Reassembler:
    """Receiver-side view of one byte stream, starting at sequence number ``next_seq``."""

    __slots__ = ("_origin", "delivered", "held", "held_bytes", "max_ahead", "max_held_bytes",
                 "max_held_segments", "pos")

    def __init__(self, next_seq: int, *, max_held_bytes: int = 256 * 1024,
                 max_held_segments: int = 512, max_ahead: int = 1 << 30) -> None:
        self._origin = next_seq & 0xFFFFFFFF
        self.pos = 0  # unwrapped offset of rcv_nxt
        self.held: list[tuple[int, int, bytes]] = []  # (start, end, data), sorted by start
        self.held_bytes = 0
        self.delivered = 0
        self.max_held_bytes = max_held_bytes
        self.max_held_segments = max_held_segments
        self.max_ahead = max_ahead

    @property
    def next_seq(self) -> int:
        """``rcv_nxt``: the sequence number of the next byte the receiver will deliver."""
        return (self._origin + self.pos) & 0xFFFFFFFF

    def offset(self, seq: int) -> int:
        """Unwrapped stream offset of ``seq`` (the one nearest to ``rcv_nxt``)."""
        delta = (seq - self._origin - self.pos) & 0xFFFFFFFF
        if delta >= HALF:
            delta -= MOD
        return self.pos + delta

    def add(self, seq: int, data: bytes | memoryview) -> tuple[int, bytes]:
        """Take a data segment; return (status, newly deliverable bytes, maybe empty)."""
        n = len(data)
        if not n:
            return DUPLICATE, b""
        delta = (seq - self._origin - self.pos) & 0xFFFFFFFF
        if delta == 0 and not self.held:  # the common case: next in order, nothing held
            self.pos += n
            self.delivered += n
            return IN_ORDER, bytes(data)
        if delta >= HALF:
            delta -= MOD
        start = self.pos + delta
        end = start + n
        if end <= self.pos:
            return DUPLICATE, b""
        if start <= self.pos:
            # Rule 1: cut at rcv_nxt, then drain what the new bytes made contiguous.
            out = [bytes(data[self.pos - start:])]
            self.pos = end
            self._drain(out)
            chunk = b"".join(out)
            self.delivered += len(chunk)
            return IN_ORDER, chunk
        if delta > self.max_ahead:
            return BEYOND, b""
        return self._hold(start, end, data)

    def _drain(self, out: list[bytes]) -> None:
        held = self.held
        i = 0
        while i < len(held) and held[i][0] <= self.pos:
            s, e, d = held[i]
            if e > self.pos:
                out.append(d[self.pos - s:])
                self.pos = e
            self.held_bytes -= e - s
            i += 1
        if i:
            del held[:i]

    def _hold(self, start: int, end: int, data: bytes | memoryview) -> tuple[int, bytes]:
        held = self.held
        replace = -1
        for i, (s, e, _) in enumerate(held):
            if s > start:
                break
            if s == start:
                if end <= e:
                    return DUPLICATE, b""  # same start, not longer: the held one stays
                replace = i  # same start, longer: the new one replaces it
            elif end <= e:
                return DUPLICATE, b""  # inside a segment that starts lower: never delivered
        # Held segments starting later and lying wholly inside the new one are never delivered.
        covered = [i for i, (s, e, _) in enumerate(held) if s > start and e <= end]
        freed = sum(held[i][1] - held[i][0] for i in covered)
        if replace >= 0:
            covered.append(replace)
            freed += held[replace][1] - held[replace][0]
        if (self.held_bytes - freed + end - start > self.max_held_bytes
                or len(held) - len(covered) + 1 > self.max_held_segments):
            return FULL, b""
        for i in sorted(covered, reverse=True):
            del held[i]
        self.held_bytes += end - start - freed
        insort(held, (start, end, bytes(data)))
        return HELD, b""

    def rewind(self, seq: int) -> None:
        """Count the bytes from ``seq`` on as never delivered and forget what is held: a node
        that dropped them checks their resend as new bytes."""
        back = self.pos - self.offset(seq)
        if 0 < back <= self.pos:
            self.pos -= back
            self.delivered -= back
        self.forget_held()

    def forget_held(self) -> None:
        """Drop every out-of-order byte held: the sender has to send them again (a node in
        the path that gave up their packets must not count them as delivered later)."""
        self.held.clear()
        self.held_bytes = 0

    def holes(self) -> list[tuple[int, int]]:
        """Missing ranges between rcv_nxt and the last held byte, as sequence numbers."""
        out = []
        pos = self.pos
        for s, e, _ in self.held:
            if s > pos:
                out.append(((self._origin + pos) & 0xFFFFFFFF, (self._origin + s) & 0xFFFFFFFF))
            pos = max(pos, e)
        return out
