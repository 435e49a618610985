"""Baseline 1: reset injection, what intrusion prevention systems do today.

On the trigger the malicious segment is dropped and the node forges a RST to each side at the
sequence number that side expects next (RFC 5961: only a RST at exactly ``rcv_nxt`` resets; one
merely in the window earns a challenge ACK), so both kernels tear the connection down: the
benign bytes after the malicious message are lost with it and both applications see an error.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

from node.kernel.nfqueue import Handle, Scheduler
from node.stack.conntrack import Flow
from node.stack.packet import ACK, RST
from node.takeover.adapter import Link, Trigger, open_raw_socket
from node.takeover.tcp import Segment
from node.takeover.wire import build

log = logging.getLogger(__name__)


class ResetEngine:
    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self.sock: socket.socket | None = None
        self.stats: Counter[str] = Counter()
        self._answered: int | None = None  # the flow whose resets ``answer`` sent

    def start(self, loop: Scheduler) -> None:
        if self.sock is None:
            self.sock = open_raw_socket(self.netns)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def offer(self, payload: bytes, handle: Handle, now: float) -> bool:
        return False

    def answer(self, flow: Flow, seq: int, n: int, ack: int, tsval: int | None,
               link: Link | None, now: float) -> None:
        """The resets go out before the stack takes the trigger, as the takeover's ACK does."""
        self._reset(flow, seq, ack)
        self._answered = flow.id

    def trigger(self, t: Trigger, handle: Handle, now: float) -> None:
        handle.drop()
        if self._answered != t.flow.id:
            self._reset(t.flow, t.seq, t.flow.halves[0].ack)
        self._answered = None
        self.stats["reset"] += 1

    def _reset(self, flow: Flow, seq: int, client_ack: int | None) -> None:
        s = flow.halves[1]
        (caddr, cport), (saddr, sport) = flow.orig, flow.resp
        assert self.sock is not None
        # To the client first (it is the side that matters for the timing comparison): at what
        # the server sent, and at the client's last ACK if that lags (a delayed ACK).
        seqs = [x for x in dict.fromkeys((s.next_seq, client_ack)) if x is not None]
        pkts = [(caddr, build(saddr, caddr, sport, cport, Segment(q, seq, RST | ACK, 0)))
                for q in seqs]
        pkts.append((saddr, build(caddr, saddr, cport, sport,
                                  Segment(seq, s.next_seq or 0, RST | ACK, 0))))
        for dst, pkt in pkts:
            try:
                self.sock.sendto(pkt, (socket.inet_ntoa(dst), 0))
                self.stats["rst_sent"] += 1
            except OSError as exc:
                self.stats["send_errors"] += 1
                log.debug("reset send: %s", exc)
