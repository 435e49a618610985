"""A user-level TCP endpoint for a connection taken over mid-stream (sans-I/O).

The node never saw this connection's handshake from the inside: it starts from what the user-level
stack observed on the wire (a :class:`Seed`: sequence numbers, windows and their scale, MSS,
timestamps) and goes on as if it had been the impersonated side all along. Nothing here reads a
clock or a socket: ``receive(segment, now)`` takes a peer's segment, ``poll(now)`` returns the
segments to transmit (data, ACKs, retransmissions, FIN) and runs the timers that are due,
``deadline()`` says when ``poll`` must run next. The application side is ``write``/``read``/
``shutdown``, which is how the proxy relays bytes between its two endpoints.

What it does, and the references it follows:

- established-state transfer with cumulative ACKs and the RFC 793 window-update rule
  (``snd_wl1``/``snd_wl2``), windows scaled by the shifts both SYNs agreed (RFC 7323 §2), and an
  advertised right edge that never moves left (RFC 7323 §2.4: a peer may have sent up to it);
- timestamps kept (RFC 7323 §3-5): our TSval continues the impersonated side's clock at 1 kHz, the
  TSecr echoes ``ts_recent``, which is updated only by segments at or before the last ACK sent,
  and PAWS drops old segments with a duplicate ACK, as Linux does;
- retransmission per RFC 6298 (SRTT/RTTVAR from unambiguous samples only, Karn; exponential
  backoff; 200 ms floor as in Linux) with go-back-N after a timeout, fast retransmit on three
  duplicate ACKs and NewReno partial ACKs (RFC 6582), slow start and congestion avoidance
  (RFC 5681), zero-window probes with ``seq = snd_una - 1`` (Linux's form) on a persist timer;
- FIN in both orders and simultaneous close (ESTABLISHED, FIN_WAIT_1/2, CLOSING, TIME_WAIT,
  CLOSE_WAIT, LAST_ACK);
- RST in every state as RFC 5961 §3 and Linux take it: only a RST at exactly ``rcv_nxt`` resets,
  one elsewhere in the window earns a (rate-limited) challenge ACK, others are ignored; a SYN on
  the synchronized connection also earns a challenge ACK (§4).

It never sends a RST: a node that took a connection over finishes it with FINs (the issue's
policy), and an endpoint that gives up after too many timeouts goes quiet (``aborted``).

Bytes the impersonated side had sent before the takeover and the peer has not acknowledged may be
unknown to the node (it keeps only a bounded tail of each direction). They sit at the front of the
send buffer as a *hole*: never transmitted (the node cannot invent them); if the peer lost them
the endpoint keeps probing with bare ACKs and counts ``hole_stalls``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum

from node.stack.packet import ACK, FIN, PSH, RST, SYN

MASK = 0xFFFFFFFF
HALF = 1 << 31
PAWS_WINDOW = 1  # Linux TCP_PAWS_WINDOW: a TSval this much behind ts_recent still passes


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in sequence space, as a signed number (|diff| < 2**31)."""
    d = (a - b) & MASK
    return d - (1 << 32) if d >= HALF else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


class State(IntEnum):
    ESTABLISHED = 1
    FIN_WAIT_1 = 2  # our FIN sent, not acknowledged
    FIN_WAIT_2 = 3  # our FIN acknowledged, the peer's not received
    CLOSING = 4  # both FINs sent, ours not acknowledged
    TIME_WAIT = 5
    CLOSE_WAIT = 6  # the peer's FIN received, ours not sent
    LAST_ACK = 7  # the peer's FIN received, ours sent
    CLOSED = 8


@dataclass(slots=True)
class Segment:
    """A TCP segment without addresses: what the endpoint takes and emits. ``window`` is the
    raw (unscaled) header field; ``tsval``/``tsecr`` are None without the timestamp option."""

    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    tsval: int | None = None
    tsecr: int | None = None
    sack: tuple[tuple[int, int], ...] = ()  # SACK blocks (left, right)

    @property
    def seg_len(self) -> int:
        return len(self.payload) + (1 if self.flags & FIN else 0) + (1 if self.flags & SYN else 0)


@dataclass(slots=True)
class Seed:
    """The impersonated side's state as observed on the wire at the moment of takeover."""

    snd_una: int  # the peer's last ACK: the oldest byte we sent that it has not acknowledged
    snd_nxt: int  # the next sequence number we send (what the impersonated side sent so far)
    rcv_nxt: int  # the next sequence number expected from the peer
    snd_wnd: int  # the peer's last window, in bytes (already scaled)
    snd_shift: int | None  # the peer's window-scale shift; None: unknown, read windows unscaled
    rcv_shift: int | None  # the shift our advertised windows carry; None: unknown (see rcv_raw)
    rcv_adv: int | None  # the right edge the impersonated side last advertised (never shrinks)
    rcv_raw: int  # its last raw window field, advertised as is while rcv_shift is unknown
    mss: int  # payload bytes per segment towards the peer (options already taken off)
    ts_val: int | None  # the impersonated side's last TSval; None: no timestamps
    ts_recent: int | None  # the peer's last TSval
    unacked: bytes | None = None  # a copy of [snd_una, snd_nxt) (None or short: a hole)
    peer_fin: bool = False  # rcv_nxt already counts the peer's FIN
    sack_ok: bool = False  # both SYNs carried SACK-permitted (RFC 2018)


@dataclass(frozen=True, slots=True)
class Config:
    rcvbuf: int = 256 * 1024  # bytes received and not yet read before the window closes
    sndbuf: int = 256 * 1024  # bytes the application may queue (``send_space``)
    rto_init: float = 0.25  # before any RTT sample (the peer is already talking to us)
    rto_min: float = 0.2  # Linux's floor
    rto_max: float = 60.0
    max_retries: int = 12  # timeouts in a row before the endpoint gives up (goes quiet)
    time_wait: float = 60.0  # Linux TCP_TIMEWAIT_LEN: a lost last ACK must still be re-sent
    init_cwnd: int = 10  # segments (RFC 6928)
    max_ooo: int = 512 * 1024  # out-of-order bytes held
    max_ooo_segments: int = 512
    challenge_interval: float = 0.5  # at most one challenge / out-of-window ACK per interval
    ack_every: int = 2  # segments received before a pure ACK goes out without a flush


DEFAULT_CONFIG = Config()


class Endpoint:
    """One side of a connection, impersonated. See the module docstring."""

    __slots__ = ("_ack_now", "_ack_pending", "_challenge_at", "_hole_end", "_ooo", "_ooo_bytes",
                 "_persist_at", "_persist_backoff", "_rcv_raw", "_recover", "_rexmit", "_rto_at",
                 "_rtt_seq", "_rtt_time", "_sbase", "_t_base", "_ts_base", "_tw_at",
                 "_unacked_segs", "aborted", "config", "cwnd", "dupacks", "eof", "fin_queued",
                 "fin_seq", "mss", "peer_fin_seq", "rcv_adv", "rcv_nxt", "rcv_shift", "rcv_wup",
                 "rcvq", "reset", "retries", "rto", "rttvar", "sack_ok", "sacked", "sendq",
                 "snd_max", "snd_nxt", "snd_shift", "snd_una", "snd_wl1", "snd_wl2", "snd_wnd",
                 "srtt", "ssthresh", "state", "stats", "ts", "ts_recent")

    def __init__(self, seed: Seed, now: float, config: Config | None = None) -> None:
        c = config or DEFAULT_CONFIG
        self.config = c
        self.state = State.ESTABLISHED
        self.mss = max(1, seed.mss)
        # send side
        self.snd_una = seed.snd_una & MASK
        if seq_lt(seed.snd_nxt, self.snd_una):  # the peer acked more than we saw sent
            self.snd_una = seed.snd_nxt & MASK
        self.snd_nxt = seed.snd_nxt & MASK
        self.snd_max = self.snd_nxt
        self.snd_wnd = max(0, seed.snd_wnd)
        self.snd_shift = seed.snd_shift
        self.snd_wl1 = seq_add(seed.rcv_nxt, -1)  # the first segment from the peer updates it
        self.snd_wl2 = self.snd_una
        self._sbase = self.snd_una  # sequence number of sendq[0]
        known = seed.unacked or b""
        gap = seq_diff(self.snd_nxt, self.snd_una)
        known = known[len(known) - gap:] if len(known) > gap else known
        self._hole_end = seq_add(self.snd_una, gap - len(known))  # before this: unknown bytes
        self.sendq = bytearray(gap - len(known)) + known
        self.fin_queued = False
        self.fin_seq: int | None = None
        # SACK (RFC 2018): what the peer holds above snd_una, skipped when retransmitting; and
        # the blocks we report for what we hold out of order
        self.sack_ok = seed.sack_ok
        self.sacked: list[tuple[int, int]] = []  # merged (start, end), ascending from snd_una
        # receive side
        self.rcv_nxt = seed.rcv_nxt & MASK
        self.rcv_shift = seed.rcv_shift
        self._rcv_raw = min(max(seed.rcv_raw, 0), 0xFFFF)
        self.rcv_adv = seed.rcv_adv & MASK if seed.rcv_adv is not None else self.rcv_nxt
        if seq_lt(self.rcv_adv, self.rcv_nxt):
            self.rcv_adv = self.rcv_nxt
        self.rcv_wup = self.rcv_nxt  # rcv_nxt when we last sent an ACK
        self.rcvq = bytearray()
        self._ooo: list[tuple[int, bytes]] = []  # (offset from rcv_nxt at insert time, data)
        self._ooo_bytes = 0
        self.peer_fin_seq: int | None = None
        self.eof = False  # the peer's FIN was taken in order: no more data will come
        if seed.peer_fin:
            self.eof = True
            self.state = State.CLOSE_WAIT
        # timestamps: our clock continues the impersonated side's at 1 kHz
        self.ts = seed.ts_val is not None
        self._ts_base = seed.ts_val or 0
        self._t_base = now
        self.ts_recent = seed.ts_recent
        # retransmission and congestion control
        self.rto = c.rto_init
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self.retries = 0
        self.cwnd = c.init_cwnd * self.mss
        self.ssthresh = 1 << 30
        self.dupacks = 0
        self._recover: int | None = None  # NewReno: snd_max when fast recovery began
        self._rexmit = False  # retransmit the segment at snd_una on the next poll
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._tw_at: float | None = None
        self._persist_backoff = 1
        # ACK state
        self._ack_pending = False
        self._ack_now = False
        self._unacked_segs = 0
        self._challenge_at = float("-inf")
        self.aborted = False
        self.reset = False  # a valid RST closed it
        self.stats: Counter[str] = Counter()
        if seq_lt(self._sbase, self._hole_end):
            self.stats["hole_bytes"] = seq_diff(self._hole_end, self._sbase)
        if self.snd_max != self.snd_una:
            self._rto_at = now + self.rto

    # ------------------------------------------------------------------ application side

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (the proxy checks ``send_space`` first)."""
        if data and self.fin_queued:
            raise RuntimeError("write after shutdown")
        if data and self.state not in (State.CLOSED, State.TIME_WAIT):
            self.sendq += data

    def send_space(self) -> int:
        if self.fin_queued or self.state in (State.CLOSED, State.TIME_WAIT):
            return 0
        return max(0, self.config.sndbuf - self._unsent())

    def readable(self) -> int:
        return len(self.rcvq)

    def read(self, n: int = -1) -> bytes:
        """Take up to ``n`` received in-order bytes (all with -1). Reading opens the window; a
        window that grows from almost closed is announced at once."""
        if n < 0 or n >= len(self.rcvq):
            data = bytes(self.rcvq)
            self.rcvq.clear()
        else:
            data = bytes(self.rcvq[:n])
            del self.rcvq[:n]
        if data and self.state != State.CLOSED:
            edge_gain = seq_diff(seq_add(self.rcv_nxt, self._free()), self.rcv_adv)
            if edge_gain >= min(self.config.rcvbuf // 2, 2 * self.mss) or \
                    seq_diff(self.rcv_adv, self.rcv_nxt) < self.mss <= edge_gain:
                self._ack_pending = self._ack_now = True
        return data

    def shutdown(self) -> None:
        """Send FIN after the queued bytes."""
        if self.fin_queued or self.state in (State.CLOSED, State.TIME_WAIT, State.LAST_ACK,
                                             State.CLOSING, State.FIN_WAIT_1,
                                             State.FIN_WAIT_2):
            return
        self.fin_queued = True

    def sent_ack(self, seg: Segment) -> None:
        """A pure ACK for this endpoint went out by another way (the takeover's immediate
        acknowledgement of the trigger): account for it instead of sending it again."""
        shift = self.rcv_shift or 0
        edge = seq_add(seg.ack, seg.window << shift)
        if seq_lt(self.rcv_adv, edge):
            self.rcv_adv = edge
        self.rcv_wup = seg.ack
        if seg.ack == self.rcv_nxt:
            self._ack_pending = self._ack_now = False
            self._unacked_segs = 0
        self.stats["segs_out"] += 1

    @property
    def closed(self) -> bool:
        return self.state == State.CLOSED

    @property
    def done_sending(self) -> bool:
        """Our FIN was acknowledged (or the connection is gone)."""
        return self.state in (State.FIN_WAIT_2, State.TIME_WAIT, State.CLOSED)

    @property
    def in_flight(self) -> int:
        return seq_diff(self.snd_max, self.snd_una)

    # ------------------------------------------------------------------ network side

    def receive(self, seg: Segment, now: float) -> None:
        """Take one segment from the peer."""
        st = self.stats
        st["segs_in"] += 1
        if self.state == State.CLOSED:
            st["after_close"] += 1
            return
        flags = seg.flags
        if flags & RST:
            self._on_rst(seg, now)
            return
        if (self.ts and seg.tsval is not None and self.ts_recent is not None
                and seq_diff(self.ts_recent, seg.tsval) > PAWS_WINDOW):
            st["paws"] += 1
            self._ack_pending = self._ack_now = True  # tcp_send_dupack
            return
        if flags & SYN:
            st["syn"] += 1
            self._challenge(now)
            return
        if not self._acceptable(seg):
            st["unacceptable"] += 1
            if seq_lt(seg.seq, self.rcv_nxt):
                self._ack_pending = self._ack_now = True  # old data: our ACK was lost
            else:
                self._challenge(now)  # ahead of the window: rate-limited like Linux
            return
        if not flags & ACK:
            st["no_ack"] += 1
            return
        if not self._on_ack(seg, now):
            return
        if self.ts and seg.tsval is not None and seq_le(seg.seq, self.rcv_wup) and (
                self.ts_recent is None or seq_diff(seg.tsval, self.ts_recent) >= 0):
            self.ts_recent = seg.tsval
        if seg.payload:
            self._on_data(seg)
        if flags & FIN:
            self.peer_fin_seq = seq_add(seg.seq, len(seg.payload))
            self._ack_pending = self._ack_now = True
        if self.peer_fin_seq is not None and not self.eof and self.peer_fin_seq == self.rcv_nxt:
            self._on_fin(now)
        elif self.state == State.TIME_WAIT and flags & FIN:
            self._tw_at = now + self.config.time_wait  # a retransmitted FIN: ACK it again

    def poll(self, now: float, *, flush: bool = True) -> list[Segment]:
        """Run due timers and return what to transmit now. ``flush=False`` holds back a pure ACK
        that may wait for the end of a batch (every second segment is still acknowledged)."""
        out: list[Segment] = []
        if self._tw_at is not None and now >= self._tw_at:
            self._tw_at = None
            self.state = State.CLOSED
            return out
        if self._rto_at is not None and now >= self._rto_at:
            self._on_rto(now)
        if self.state == State.CLOSED:
            return out
        if self._persist_at is not None and now >= self._persist_at:
            self._persist_at = None
            self.stats["window_probes"] += 1
            out.append(self._seg(seq_add(self.snd_una, -1), ACK, b"", now))
            self._persist_backoff *= 2
        if self._rexmit:
            self._rexmit = False
            self._retransmit_one(now, out)
        self._output(now, out)
        if self._ack_pending and not out and (
                flush or self._ack_now or self._unacked_segs >= self.config.ack_every):
            out.append(self._seg(self.snd_nxt, ACK, b"", now))
        if out:
            self._ack_pending = self._ack_now = False
            self._unacked_segs = 0
        return out

    def deadline(self) -> float | None:
        """When ``poll`` must run next (None: only when a segment arrives)."""
        ds = [d for d in (self._rto_at, self._persist_at, self._tw_at) if d is not None]
        return min(ds) if ds else None

    # ------------------------------------------------------------------ receive helpers

    def _free(self) -> int:
        return max(0, self.config.rcvbuf - len(self.rcvq) - self._ooo_bytes)

    def _acceptable(self, seg: Segment) -> bool:
        """Linux's ``tcp_sequence``: not wholly before the last ACK we sent (``rcv_wup``) and
        not starting past the right edge we advertised."""
        end = seq_add(seg.seq, len(seg.payload) + (1 if seg.flags & FIN else 0))
        return not seq_lt(end, self.rcv_wup) and not seq_lt(self.rcv_adv, seg.seq)

    def _challenge(self, now: float) -> None:
        if now - self._challenge_at >= self.config.challenge_interval:
            self._challenge_at = now
            self.stats["challenge_acks"] += 1
            self._ack_pending = self._ack_now = True

    def _on_rst(self, seg: Segment, now: float) -> None:
        st = self.stats
        after_fin = self.eof and seg.seq == seq_add(self.rcv_nxt, -1)  # tcp_reset_check
        if seg.seq == self.rcv_nxt or after_fin:
            st["rst"] += 1
            self.reset = True
            self._close()
            return
        wnd = max(seq_diff(self.rcv_adv, self.rcv_nxt), 1)
        if 0 < seq_diff(seg.seq, self.rcv_nxt) < wnd:
            st["rst_challenged"] += 1
            self._challenge(now)
        else:
            st["rst_ignored"] += 1

    def _on_ack(self, seg: Segment, now: float) -> bool:
        """ACK processing; False if the segment must be dropped."""
        ack = seg.ack
        if seq_lt(self.snd_max, ack):
            self.stats["ack_unsent"] += 1  # RFC 793: ACK it and drop it
            self._ack_pending = self._ack_now = True
            return False
        if seq_lt(ack, self.snd_una):
            self.stats["old_ack"] += 1  # stale: ignore its ACK field, keep its data
            return True
        shift = self.snd_shift or 0
        wnd = seg.window << shift
        window_changed = False
        if seq_lt(self.snd_wl1, seg.seq) or (self.snd_wl1 == seg.seq
                                             and seq_le(self.snd_wl2, ack)):
            window_changed = wnd != self.snd_wnd
            self.snd_wnd = wnd
            self.snd_wl1, self.snd_wl2 = seg.seq, ack
            if wnd:
                self._persist_at = None
                self._persist_backoff = 1
        if seg.sack and self.sack_ok:
            self._on_sack(seg.sack)
        acked = seq_diff(ack, self.snd_una)
        if acked > 0:
            self._ack_advance(ack, acked, now)
        elif (acked == 0 and not seg.payload and not seg.flags & FIN and not window_changed
              and self.snd_max != self.snd_una):
            self.dupacks += 1
            self.stats["dupacks"] += 1
            if self.dupacks == 3 and self._recover is None:
                flight = self.in_flight
                self.ssthresh = max(flight // 2, 2 * self.mss)
                self.cwnd = self.ssthresh + 3 * self.mss
                self._recover = self.snd_max
                self._rexmit = True
                self.stats["fast_retransmits"] += 1
            elif self.dupacks > 3 and self._recover is not None:
                self.cwnd += self.mss  # each dupack: one more segment left the network
        self._maybe_persist(now)
        return True

    def _on_sack(self, blocks: tuple[tuple[int, int], ...]) -> None:
        una, top = self.snd_una, self.snd_max
        ranges = list(self.sacked)
        for left, right in blocks:
            if seq_lt(left, una):
                left = una
            if not seq_lt(left, right) or seq_lt(top, right):
                continue  # empty, below snd_una, or beyond what we sent: not believable
            ranges.append((left, right))
        ranges.sort(key=lambda r: seq_diff(r[0], una))
        merged: list[tuple[int, int]] = []
        for left, right in ranges:
            if merged and not seq_lt(merged[-1][1], left):
                if seq_lt(merged[-1][1], right):
                    merged[-1] = (merged[-1][0], right)
            else:
                merged.append((left, right))
        self.sacked = merged[:16]

    def _ack_advance(self, ack: int, acked: int, now: float) -> None:
        if self.sacked:
            self.sacked = [(ack if seq_lt(a, ack) else a, b) for a, b in self.sacked
                           if seq_lt(ack, b)]
        data_acked = min(acked, len(self.sendq))
        if data_acked:
            del self.sendq[:data_acked]
            self._sbase = seq_add(self._sbase, data_acked)
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        if self._rtt_seq is not None and seq_le(self._rtt_seq, ack):
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        self.retries = 0
        self.dupacks = 0
        if self._recover is not None:
            if seq_lt(ack, self._recover):  # partial ACK: the next hole was lost too
                self.cwnd = max(self.cwnd - acked + self.mss, self.mss)
                self._rexmit = True
                self.stats["partial_acks"] += 1
            else:
                self.cwnd = self.ssthresh
                self._recover = None
        elif self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)
        else:
            self.cwnd += max(1, self.mss * self.mss // self.cwnd)
        self.cwnd = min(self.cwnd, 1 << 30)
        if self.fin_seq is not None and seq_lt(self.fin_seq, ack):
            self._on_fin_acked(now)
        if self.snd_max == self.snd_una:
            self._rto_at = None
        else:
            self._rto_at = now + self.rto

    def _rtt_sample(self, r: float) -> None:
        c = self.config
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(max(self.srtt + max(0.001, 4 * self.rttvar), c.rto_min), c.rto_max)

    def _on_data(self, seg: Segment) -> None:
        st = self.stats
        data = seg.payload
        d = seq_diff(seg.seq, self.rcv_nxt)
        if d < 0:  # the front was already received
            data = data[-d:]
            d = 0
            st["dup_bytes"] += len(seg.payload) - len(data)
        room = seq_diff(self.rcv_adv, self.rcv_nxt) - d
        if len(data) > room:  # beyond the right edge we advertised: cut (the peer resends)
            st["beyond_window"] += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        if not data:
            self._ack_pending = self._ack_now = True
            return
        if self.eof:
            st["after_fin"] += 1
            return
        if d == 0:
            self.rcvq += data
            self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
            st["bytes_in"] += len(data)
            if self._ooo:
                self._drain_ooo()
            self._ack_pending = True
            self._unacked_segs += 1
            if seg.flags & PSH:
                self._ack_now = self._ack_now or self._unacked_segs >= self.config.ack_every
        else:
            self._hold(seq_add(self.rcv_nxt, d), data)
            self._ack_pending = self._ack_now = True  # duplicate ACK: the peer's fast retransmit

    def _hold(self, seq: int, data: bytes) -> None:
        c = self.config
        if self._ooo_bytes + len(data) > c.max_ooo or len(self._ooo) >= c.max_ooo_segments:
            self.stats["ooo_refused"] += 1
            return
        for s, d in self._ooo:
            if s == seq and len(d) >= len(data):
                return
        self._ooo.append((seq, data))
        self._ooo_bytes += len(data)
        self.stats["ooo_held"] += 1

    def _drain_ooo(self) -> None:
        progress = True
        while progress and self._ooo:
            progress = False
            for i, (s, d) in enumerate(self._ooo):
                off = seq_diff(self.rcv_nxt, s)
                if off >= 0:  # starts at or before rcv_nxt
                    del self._ooo[i]
                    self._ooo_bytes -= len(d)
                    if off < len(d):
                        new = d[off:]
                        self.rcvq += new
                        self.rcv_nxt = seq_add(self.rcv_nxt, len(new))
                        self.stats["bytes_in"] += len(new)
                    progress = True
                    break

    def _on_fin(self, now: float) -> None:
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self.eof = True
        self._ooo.clear()
        self._ooo_bytes = 0
        self._ack_pending = self._ack_now = True
        s = self.state
        if s == State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif s == State.FIN_WAIT_1:
            self.state = State.CLOSING
        elif s == State.FIN_WAIT_2:
            self._time_wait(now)

    def _on_fin_acked(self, now: float) -> None:
        s = self.state
        if s == State.FIN_WAIT_1:
            self.state = State.FIN_WAIT_2
        elif s == State.CLOSING:
            self._time_wait(now)
        elif s == State.LAST_ACK:
            self._close()

    def _time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self._rto_at = self._persist_at = None
        self._tw_at = now + self.config.time_wait

    def _close(self) -> None:
        self.state = State.CLOSED
        self._rto_at = self._persist_at = self._tw_at = None
        self._ack_pending = self._ack_now = False
        self._rexmit = False

    # ------------------------------------------------------------------ send helpers

    def _unsent(self) -> int:
        """Bytes queued and not yet sent once."""
        return max(0, len(self.sendq) - seq_diff(self.snd_max, self._sbase))

    def _tsval(self, now: float) -> int:
        return (self._ts_base + int((now - self._t_base) * 1000)) & MASK

    def _window_field(self) -> int:
        """The raw window to put in a segment; the right edge it names never moves left."""
        if self.rcv_shift is None:
            raw = self._rcv_raw
            shift = 0
        else:
            shift = self.rcv_shift
            raw = min(self._free() >> shift, 0xFFFF)
        edge = seq_add(self.rcv_nxt, raw << shift)
        if seq_lt(edge, self.rcv_adv):
            need = seq_diff(self.rcv_adv, self.rcv_nxt)
            raw = min((need + (1 << shift) - 1) >> shift, 0xFFFF)
            edge = seq_add(self.rcv_nxt, raw << shift)
        if seq_lt(self.rcv_adv, edge):
            self.rcv_adv = edge
        return raw

    def _seg(self, seq: int, flags: int, payload: bytes, now: float) -> Segment:
        self.rcv_wup = self.rcv_nxt
        ts = self.ts
        seg = Segment(seq, self.rcv_nxt, flags, self._window_field(), payload,
                      self._tsval(now) if ts else None, (self.ts_recent or 0) if ts else None,
                      self._sack_blocks() if self._ooo and self.sack_ok else ())
        self.stats["segs_out"] += 1
        return seg

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """What we hold out of order, merged; the block with the latest arrival first (RFC 2018
        §4); three fit beside the timestamp option, four without it."""
        spans = sorted(((s, seq_add(s, len(d))) for s, d in self._ooo),
                       key=lambda r: seq_diff(r[0], self.rcv_nxt))
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and not seq_lt(merged[-1][1], a):
                if seq_lt(merged[-1][1], b):
                    merged[-1][1] = b
            else:
                merged.append([a, b])
        last = self._ooo[-1][0]
        first = next((m for m in merged if not seq_lt(last, m[0]) and seq_lt(last, m[1])),
                     merged[0])
        blocks = [first] + [m for m in merged if m is not first]
        return tuple((a, b) for a, b in blocks[:3 if self.ts else 4])

    def _retransmit_one(self, now: float, out: list[Segment]) -> None:
        """Fast retransmit / partial ACK: the first unacknowledged segment, once."""
        if self.snd_una == self.snd_max:
            return
        saved = self.snd_nxt
        self.snd_nxt = self.snd_una
        self._send_one(now, out, window_limit=False)
        if seq_lt(self.snd_nxt, saved):
            self.snd_nxt = saved

    def _output(self, now: float, out: list[Segment]) -> None:
        while self.state != State.CLOSED and self._send_one(now, out):
            pass
        self._maybe_persist(now)

    def _send_one(self, now: float, out: list[Segment], window_limit: bool = True) -> bool:
        """Send the segment at snd_nxt if anything and the windows allow; True if one went."""
        data_end = seq_add(self._sbase, len(self.sendq))
        pending = seq_diff(data_end, self.snd_nxt)
        if pending > 0:
            if self.state not in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1,
                                  State.LAST_ACK, State.CLOSING):
                return False
            if seq_lt(self.snd_nxt, self._hole_end):
                # Bytes the node never had: it cannot send them; a bare ACK keeps the peer
                # talking (its ACK may cover them, or its dupacks say it lost them).
                self.stats["hole_stalls"] += 1
                out.append(self._seg(self.snd_una, ACK, b"", now))
                self._arm_rto(now)
                return False
            room = pending  # bytes this segment may carry (up to a SACKed block)
            if self.sacked and seq_lt(self.snd_nxt, self.snd_max):
                for a, b in self.sacked:  # the peer holds these already: go past them
                    if not seq_lt(self.snd_nxt, a) and seq_lt(self.snd_nxt, b):
                        self.snd_nxt = b
                        self.stats["sack_skipped"] += 1
                        return True
                    if seq_lt(self.snd_nxt, a):
                        room = min(room, seq_diff(a, self.snd_nxt))
                        break
            if window_limit:
                limit = min(self.snd_wnd, self.cwnd) - seq_diff(self.snd_nxt, self.snd_una)
                if limit <= 0:
                    return False
                n = min(self.mss, room, limit)
                if n < self.mss and n < room and self.snd_max != self.snd_una:
                    return False  # silly window: wait for the ACK clock
            else:
                n = min(self.mss, room)
            off = seq_diff(self.snd_nxt, self._sbase)
            payload = bytes(self.sendq[off:off + n])
            flags = ACK
            last = n == pending
            if last:
                flags |= PSH
            fin = last and self.fin_queued and (self.fin_seq is None
                                                or self.fin_seq == data_end)
            if fin:
                flags |= FIN
            self._emit(now, out, flags, payload, fin)
            return True
        if (self.fin_queued and self.snd_nxt == data_end
                and (self.fin_seq is None or seq_le(self.snd_nxt, self.fin_seq))
                and self.state in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1,
                                   State.CLOSING, State.LAST_ACK)):
            self._emit(now, out, ACK | FIN, b"", True)
        return False

    def _emit(self, now: float, out: list[Segment], flags: int, payload: bytes,
              fin: bool) -> None:
        seq = self.snd_nxt
        retrans = seq_lt(seq, self.snd_max)
        out.append(self._seg(seq, flags, payload, now))
        n = len(payload)
        end = seq_add(seq, n)
        if fin:
            if self.fin_seq is None:
                self.fin_seq = end
                if self.state == State.ESTABLISHED:
                    self.state = State.FIN_WAIT_1
                elif self.state == State.CLOSE_WAIT:
                    self.state = State.LAST_ACK
            end = seq_add(end, 1)
        if retrans:
            self.stats["retransmits"] += 1
            if self._rtt_seq is not None and seq_le(seq, self._rtt_seq):
                self._rtt_seq = None  # Karn: no sample from a retransmitted range
        else:
            self.stats["bytes_out"] += n
            if self._rtt_seq is None:
                self._rtt_seq, self._rtt_time = end, now
        self.snd_nxt = end
        if seq_lt(self.snd_max, end):
            self.snd_max = end
        self._arm_rto(now)

    def _arm_rto(self, now: float) -> None:
        if self._rto_at is None:
            self._rto_at = now + self.rto

    def _maybe_persist(self, now: float) -> None:
        """Zero window with data waiting and nothing in flight: probe on a backed-off timer."""
        data_end = seq_add(self._sbase, len(self.sendq))
        if (self.snd_wnd == 0 and self.snd_max == self.snd_una
                and seq_lt(self.snd_nxt, data_end) and self._persist_at is None
                and self.state != State.CLOSED):
            self._persist_at = now + min(self.rto * self._persist_backoff, self.config.rto_max)

    def _on_rto(self, now: float) -> None:
        self._rto_at = None
        if self.snd_max == self.snd_una:
            return
        c = self.config
        self.retries += 1
        self.stats["timeouts"] += 1
        if self.retries > c.max_retries:
            self.aborted = True
            self.stats["aborted"] += 1
            self._close()
            return
        self.ssthresh = max(self.in_flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.snd_nxt = self.snd_una  # go back N
        self._recover = None
        self.dupacks = 0
        self._rtt_seq = None
        self.rto = min(self.rto * 2, c.rto_max)
        self._rexmit = False  # the go-back-N pass in poll() resends from snd_una
