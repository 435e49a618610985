"""The user-level stack: parsing, connection tracking and reassembly composed.

``Stack.handle(packet, now) -> list[Event]`` takes one IP packet (bytes, bytearray or a
``memoryview`` of a pool buffer) and never raises: malformed input and internal errors become a
``Drop`` event and a counter in ``stats``. Events (``node.stack.events``): flows opened,
established and closed; ``MessageIn`` for bytes a protected service receives, in the order and
with the overlaps resolved the way its Linux kernel delivers them; ``Drop`` advice for an inline
adapter.

The hot path is an established TCP segment with only ACK/PSH set and at most the timestamp
option: it is read with one ``struct`` call straight from the buffer, looked up by a 12-byte
slice of the IPv4 header (addresses and ports), and appended to the stream without building
header objects. Everything else takes the general parsers (``node.stack.packet``).

Checksums: with ``verify_checksums`` (the default; passive mode and tests) every IP, TCP, UDP
and ICMP checksum is checked in Python, about 5 µs for a full-size segment. On the NFQUEUE path
the kernel has already done it: IP header checksums are checked before the prerouting hook, and
conntrack (``nf_conntrack_checksum``, on by default) marks TCP/UDP packets with bad checksums
``invalid`` at prerouting, which ``node.kernel.nft`` drops for protected ports before they are
queued. So the inline adapter runs the stack with ``verify_checksums=False``.
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from dataclasses import dataclass, field

from node.stack.conntrack import (
    ConnTrack,
    Flow,
    FlowDir,
    TcpHalf,
    TcpState,
    Timeouts,
    flow_key,
)
from node.stack.events import (
    Drop,
    Event,
    FlowClosed,
    FlowEstablished,
    FlowOpened,
    MessageIn,
)
from node.stack.packet import (
    ACK,
    FIN,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    RST,
    SYN,
    TCP,
    UDP,
    IPv4,
    IPv6,
    PacketError,
    TcpOptions,
    parse_icmp,
    parse_ip,
    parse_tcp,
    parse_udp,
)
from node.stack.reassembly import FULL, IN_ORDER, Reassembler
from sca.alert import Message

MASK = 0xFFFFFFFF
HALF = 1 << 31
_FAST = struct.Struct("!HHIIBBH")  # TCP header at offset 20: ports, seq, ack, offset, flags, window
_II = struct.Struct("!II")
_TS_FAST = b"\x01\x01\x08\x0a"
_NO_OPTS = TcpOptions()
_ESTABLISHED = TcpState.ESTABLISHED
_EXPIRE_EVERY = 1.0  # seconds of ``now`` between two expiry passes inside handle()


def _after(a: int, b: int) -> bool:
    """Sequence number ``a`` is after ``b`` (mod 2**32)."""
    return 0 < ((a - b) & MASK) < HALF


@dataclass
class StackConfig:
    protected_tcp: set[int] = field(default_factory=set)
    protected_udp: set[int] = field(default_factory=set)
    verify_checksums: bool = True
    max_flows: int = 65536  # per protocol
    max_held_bytes: int = 256 * 1024  # out-of-order bytes held per stream
    max_held_total: int = 64 << 20  # ... and in all streams together (past it: refused)
    max_held_per_source: int = 8 << 20  # ... and in the streams of one client address
    max_held_segments: int = 512
    pickup: bool = True  # track TCP flows first seen mid-stream
    enforce_window: bool = True  # refuse data at or past the receiver's advertised right edge
    enforce_paws: bool = True  # refuse data failing the receiver's PAWS check
    timeouts: Timeouts = field(default_factory=Timeouts)


class Stack:
    """Sans-I/O: no sockets, no clock; ``now`` comes with every packet."""

    def __init__(self, config: StackConfig | None = None) -> None:
        c = config or StackConfig()
        self.config = c
        self.protected_tcp: set[int] = set(c.protected_tcp)
        self.protected_udp: set[int] = set(c.protected_udp)
        self.tcp = ConnTrack(IPPROTO_TCP, max_flows=c.max_flows, timeouts=c.timeouts)
        self.udp = ConnTrack(IPPROTO_UDP, max_flows=c.max_flows, timeouts=c.timeouts)
        self.stats: Counter[str] = Counter()
        self.packets = 0
        self._verify = c.verify_checksums
        self._ids = itertools.count(1)
        self._next_expire = float("-inf")
        # Flows holding out-of-order bytes, with the bytes counted for each in ``held_total``
        # and in their client's ``_held_by``.
        self._holding: dict[int, int] = {}
        self._held_by: dict[bytes, int] = {}
        self.held_total = 0

    # ------------------------------------------------------------------ entry points

    def handle(self, packet: bytes | bytearray | memoryview, now: float, *,
               trusted: bool = False) -> list[Event]:
        """Process one IP packet. Never raises. ``trusted``: its checksums are known good or
        not yet computed (a capture reports that per packet), so they are not checked."""
        self.packets += 1
        try:
            p = packet
            verify = self._verify and not trusted
            events: list[Event] | None = None
            if (not verify and len(p) >= 40 and p[0] == 0x45 and p[9] == 6
                    and not (p[6] & 0x3F or p[7])):
                fd = self.tcp.table.get(bytes(p[12:24]))
                if fd is not None:
                    flow = fd.flow
                    if (flow.state is _ESTABLISHED and flow.deadline >= now
                            and (p[33] & 0x17) == ACK):
                        events = self._fast(p, fd, flow, now)
            if events is None:
                events = self._slow(p, now, verify)
            if now >= self._next_expire:
                self._next_expire = now + _EXPIRE_EVERY
                events.extend(self.expire(now))
            return events
        except PacketError as exc:
            self.stats["malformed"] += 1
            return [Drop(f"malformed: {exc}")]
        except Exception as exc:  # a bug must not take the node down; drop what caused it
            self.stats["internal_error"] += 1
            return [Drop(f"internal error: {type(exc).__name__}: {exc}")]

    def expire(self, now: float) -> list[Event]:
        """Forget flows idle past their timeout; report the open ones as closed."""
        gone = [*self.tcp.expire(now), *self.udp.expire(now)]
        for f in gone:
            self.forget_held(f)
        return [FlowClosed(f.id, "timeout") for f in gone]

    def _count_held(self, flow: Flow) -> None:
        """After ``flow``'s stream changed what it holds: the counts."""
        held = flow.stream.held_bytes if flow.stream is not None else 0
        delta = held - self._holding.pop(flow.id, 0)
        self.held_total += delta
        src = flow.orig[0]
        by = self._held_by.get(src, 0) + delta
        if by:
            self._held_by[src] = by
        else:
            self._held_by.pop(src, None)
        if held:
            self._holding[flow.id] = held

    def forget_held(self, flow: Flow) -> None:
        """Forget the bytes ``flow``'s stream holds past a hole (``Reassembler.forget_held``),
        out of the counts too."""
        if flow.stream is not None:
            flow.stream.forget_held()
        if flow.id in self._holding:
            self._count_held(flow)

    def rewind(self, flow: Flow, seq: int) -> None:
        """Count ``flow``'s bytes from ``seq`` on as never delivered and forget what it holds
        (``Reassembler.rewind``): a node that dropped them checks their resend as new."""
        if flow.stream is not None:
            flow.stream.rewind(seq)
        self.forget_held(flow)

    def _close(self, flow: Flow, now: float) -> None:
        self.tcp.close(flow, now)
        self.forget_held(flow)  # no data is taken after the close

    def find(self, src: bytes, sport: int, dst: bytes, dport: int,
             proto: int = IPPROTO_TCP) -> Flow | None:
        """The flow a packet from ``src``:``sport`` to ``dst``:``dport`` belongs to."""
        table = self.tcp if proto == IPPROTO_TCP else self.udp
        fd = table.table.get(flow_key(src, dst, sport, dport))
        return fd.flow if fd else None

    def flows(self) -> list[Flow]:
        return [*self.tcp.flows(), *self.udp.flows()]

    # ------------------------------------------------------------------ fast path

    def _fast(self, p: bytes | bytearray | memoryview, fd: FlowDir, flow: Flow,
              now: float) -> list[Event] | None:
        total = (p[2] << 8) | p[3]
        _sp, _dp, seq, ack, off, flags, window = _FAST.unpack_from(p, 20)
        doff = (off >> 4) << 2
        if total > len(p) or doff < 20 or 20 + doff > total:
            return None  # malformed: the general parser says why
        tsval = tsecr = None
        if doff == 32 and p[40:44] == _TS_FAST:
            tsval, tsecr = _II.unpack_from(p, 44)
        elif doff != 20:
            return None
        plen = total - 20 - doff
        payload = memoryview(p)[20 + doff:total] if plen else None
        self.stats["fast"] += 1
        return self._established(fd, flow, seq, ack, flags, window, tsval, tsecr, payload,
                                 plen, now)

    def _established(self, fd: FlowDir, flow: Flow, seq: int, ack: int, flags: int,
                     window: int, tsval: int | None, tsecr: int | None,
                     payload: memoryview | None, plen: int, now: float) -> list[Event]:
        events: list[Event] = []
        if plen and fd.dir == 0 and flow.stream is not None:
            ev = self._data(fd, flow, seq, tsval, payload, now)  # type: ignore[arg-type]
            if ev is not None:
                if type(ev) is Drop:
                    return [ev]  # the packet goes: it changes nothing here either
                events.append(ev)
        snd = fd.snd
        snd.packets += 1
        snd.bytes += plen
        end = (seq + plen) & MASK
        nxt = snd.next_seq
        if nxt is None or 0 < ((end - nxt) & MASK) < HALF:
            snd.next_seq = end
        # An ACK older than the last one (reordered on the way: the node's per-CPU queue
        # readers, a sender that moves between CPUs) changes nothing, as in the peer's own
        # tcp_ack; at the same ACK the window only grows (Linux never shrinks the window it
        # offers). Else an old ACK would pull the edge back and drop data sent within it.
        prev = snd.ack
        if flags & ACK and (prev is None or ((ack - prev) & MASK) < HALF):
            if snd.shift is None:
                snd.ack, snd.window = ack, window
            else:
                edge = (ack + (window << snd.shift)) & MASK
                last = snd.right_edge
                if ack != prev or last is None or ((edge - last) & MASK) < HALF:
                    snd.ack, snd.window, snd.right_edge = ack, window, edge
        if tsval is not None:
            snd.ts_val = tsval
            snd.ts_ecr = tsecr
        self.tcp.touch(flow, now)
        return events

    def _data(self, fd: FlowDir, flow: Flow, seq: int, tsval: int | None,
              payload: memoryview, now: float) -> Event | None:
        """Originator data towards a protected port: checks the receiver would make, then
        reassembly."""
        stream = flow.stream
        assert stream is not None
        fin = fd.snd.fin_seq
        if flow.state >= TcpState.TIME_WAIT or (
                fin is not None and fin == stream.next_seq
                and 0 < ((seq + len(payload) - fin) & MASK) < HALF):
            # Past the sender's FIN once the stream has reached it (a FIN out of place is no
            # end: the receiver throws it away), or on a closed flow: the receiver takes none
            # of it (after the close event a stream that grew again would be state nobody frees).
            self.stats["after_close"] += 1
            return Drop("data after the connection's close", flow.id)
        cfg = self.config
        recent = flow.ts_recent
        # PAWS (tcp_paws_discard): TSval more than 1 behind ts_recent is dropped; 0 disables.
        if (tsval is not None and recent and cfg.enforce_paws
                and 1 < ((recent - tsval) & MASK) < HALF):
            self.stats["paws"] += 1
            return Drop("PAWS: old timestamp", flow.id)
        rcv = fd.rcv
        edge = rcv.right_edge
        if cfg.enforce_window and edge is not None and ((seq - edge) & MASK) < HALF:
            self.stats["beyond_window"] += 1
            return Drop("beyond the receive window", flow.id)
        start = stream.next_seq
        if (0 < ((seq - start) & MASK) < HALF and (
                self.held_total + len(payload) > cfg.max_held_total
                or self._held_by.get(flow.orig[0], 0) + len(payload) > cfg.max_held_per_source)):
            # Out of order, and every stream together, or this client's, holds all it may:
            # refused, as a full stream's is (bytes already held stay: the service may have
            # them). One client cannot fill the bound for the others.
            self.stats["reassembly_refused"] += 1
            return Drop("reassembly bound reached", flow.id)
        status, data = stream.add(seq, payload)
        if stream.held_bytes or flow.id in self._holding:
            self._count_held(flow)
        if tsval is not None and flow.timestamps:
            # tcp_replace_ts_recent: a segment starting at or before rcv_wup (the receiver's
            # last ACK) that is not older than ts_recent sets it.
            wup = rcv.ack if rcv.ack is not None else start
            if not _after(seq, wup) and (recent is None or ((tsval - recent) & MASK) < HALF):
                flow.ts_recent = tsval
        if status == IN_ORDER:
            return MessageIn(flow.id, IPPROTO_TCP, flow.resp[1], Message(data, flow.id), start)
        if status >= FULL:
            self.stats["reassembly_refused"] += 1
            return Drop("reassembly bound reached", flow.id)
        return None

    # ------------------------------------------------------------------ general path

    def _slow(self, p: bytes | bytearray | memoryview, now: float,
              verify: bool) -> list[Event]:
        ip = parse_ip(p, verify)
        if ip.is_fragment:
            # Inline, the kernel's defragmenter runs before the queue; a fragment here comes
            # from a mirror and cannot be inspected.
            self.stats["fragment"] += 1
            return [Drop("IP fragment")]
        proto = ip.proto
        if proto == IPPROTO_TCP:
            return self._tcp(ip, parse_tcp(ip, verify), now)
        if proto == IPPROTO_UDP:
            return self._udp(ip, parse_udp(ip, verify), now)
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            parse_icmp(ip, verify)
            self.stats["icmp"] += 1
            return []
        self.stats["other_proto"] += 1
        return []

    def _udp(self, ip: IPv4 | IPv6, udp: UDP, now: float) -> list[Event]:
        events: list[Event] = []
        fd = self.udp.get(flow_key(ip.src, ip.dst, udp.sport, udp.dport), now)
        if fd is None:
            fd, evicted = self.udp.create(ip.src, udp.sport, ip.dst, udp.dport, now,
                                          TcpState.NONE, next(self._ids))
            events.extend(FlowClosed(f.id, "evicted") for f in evicted)
            events.append(FlowOpened(fd.flow.id, IPPROTO_UDP, ip.src, udp.sport, ip.dst,
                                     udp.dport))
        flow = fd.flow
        fd.snd.packets += 1
        fd.snd.bytes += len(udp.payload)
        self.udp.touch(flow, now)
        if udp.dport in self.protected_udp:
            events.append(MessageIn(flow.id, IPPROTO_UDP, udp.dport,
                                    Message(bytes(udp.payload), None)))
        return events

    def _tcp(self, ip: IPv4 | IPv6, tcp: TCP, now: float) -> list[Event]:
        flags = tcp.flags
        opts = tcp.options if tcp.header_len > 20 else _NO_OPTS
        events: list[Event] = []
        fd = self.tcp.get(flow_key(ip.src, ip.dst, tcp.sport, tcp.dport), now)
        if fd is not None and flags & SYN and not flags & ACK and fd.dir == 0 \
                and fd.flow.state in (TcpState.TIME_WAIT, TcpState.CLOSED) \
                and tcp.seq != fd.snd.isn:
            fd = None  # a new connection reusing the ports of a closed one
        if fd is None:
            fd = self._new_tcp(ip, tcp, opts, now, events)
            if fd is None:
                return events
        flow = fd.flow
        if flags & RST:
            self._rst(fd, flow, tcp, now, events)
            return events
        if flags & SYN:
            self._syn(fd, flow, tcp, opts, now, events)
            return events
        if (flow.state == TcpState.SYN_RECV and fd.dir == 0 and flags & ACK
                and tcp.ack == fd.rcv.next_seq):
            if not self._tsecr_ok(flow, opts):
                self.stats["tsecr_rejected"] += 1
                return [Drop("handshake ACK echoes no SYN/ACK timestamp", flow.id)]
            flow.state = TcpState.ESTABLISHED
            events.append(FlowEstablished(flow.id))
            self._open_stream(flow)
        if flow.state in (TcpState.SYN_SENT, TcpState.SYN_RECV):
            self.tcp.touch(flow, now)
            if tcp.payload and fd.dir == 0 and flow.resp[1] in self.protected_tcp:
                # Data before the handshake completes: the service would take none of it, and
                # nobody checks it (it is no message).
                self.stats["data_before_handshake"] += 1
                events.append(Drop("data before the handshake completes", flow.id))
            return events
        ts = opts.ts
        plen = len(tcp.payload)
        more = self._established(fd, flow, tcp.seq, tcp.ack, flags, tcp.window,
                                 ts[0] if ts else None, ts[1] if ts else None,
                                 tcp.payload if plen else None, plen, now)
        if more and type(more[0]) is Drop:
            return more
        events.extend(more)
        if flags & FIN:
            self._fin(fd, flow, tcp.seq, plen, now, events)
        elif flow.state == TcpState.CLOSING:
            self._maybe_closed(flow, now, events)
        return events

    def _new_tcp(self, ip: IPv4 | IPv6, tcp: TCP, opts: TcpOptions, now: float,
                 events: list[Event]) -> FlowDir | None:
        flags = tcp.flags
        if flags & RST:
            self.stats["rst_without_flow"] += 1
            return None
        if flags & SYN and flags & ACK:
            # SYN/ACK of a handshake we did not see start: the receiver is the originator.
            fd, evicted = self.tcp.create(ip.dst, tcp.dport, ip.src, tcp.sport, now,
                                          TcpState.SYN_SENT, next(self._ids))
            fd = fd.flow.dirs[1]  # type: ignore[index]
            picked = True
        elif flags & SYN:
            fd, evicted = self.tcp.create(ip.src, tcp.sport, ip.dst, tcp.dport, now,
                                          TcpState.SYN_SENT, next(self._ids))
            picked = False
        elif self.config.pickup:
            # Mid-stream: the side whose port is protected is the server.
            server_sent = tcp.sport in self.protected_tcp and tcp.dport not in self.protected_tcp
            if server_sent:
                fd, evicted = self.tcp.create(ip.dst, tcp.dport, ip.src, tcp.sport, now,
                                              _ESTABLISHED, next(self._ids))
                fd = fd.flow.dirs[1]  # type: ignore[index]
                start = tcp.ack  # what the server expects next from the client
            else:
                fd, evicted = self.tcp.create(ip.src, tcp.sport, ip.dst, tcp.dport, now,
                                              _ESTABLISHED, next(self._ids))
                start = tcp.seq
            picked = True
            fd.flow.picked_up = True
            self._open_stream(fd.flow, start)
        else:
            self.stats["untracked"] += 1
            return None
        flow = fd.flow
        for f in evicted:
            self.forget_held(f)
            events.append(FlowClosed(f.id, "evicted"))
        (src, sport), (dst, dport) = flow.orig, flow.resp
        events.append(FlowOpened(flow.id, IPPROTO_TCP, src, sport, dst, dport, picked))
        if flags & SYN and not flags & ACK:
            self._record_syn(fd.snd, tcp, opts)
            flow.picked_up = False
            self.tcp.touch(flow, now)
            return None  # the SYN is fully handled
        return fd

    @staticmethod
    def _record_syn(h: TcpHalf, tcp: TCP, opts: TcpOptions) -> None:
        h.isn = tcp.seq
        h.next_seq = (tcp.seq + 1 + len(tcp.payload)) & MASK
        h.mss = opts.mss
        h.wscale = opts.wscale
        h.sack_ok = opts.sack_ok
        h.ts_ok = opts.ts is not None
        if opts.ts is not None:
            h.ts_val, h.ts_ecr = opts.ts
        h.window = tcp.window
        h.packets += 1

    def _syn(self, fd: FlowDir, flow: Flow, tcp: TCP, opts: TcpOptions, now: float,
             events: list[Event]) -> None:
        flags = tcp.flags
        orig, resp = flow.halves
        if not flags & ACK:
            if fd.dir == 0 and flow.state == TcpState.SYN_SENT and tcp.seq == orig.isn:
                self._record_syn(orig, tcp, opts)  # retransmitted SYN
                self.tcp.touch(flow, now)
            else:
                self.stats["syn_ignored"] += 1
            return
        if fd.dir != 1 or flow.state not in (TcpState.SYN_SENT, TcpState.SYN_RECV):
            self.stats["synack_ignored"] += 1
            return
        if orig.isn is not None and tcp.ack != (orig.isn + 1) & MASK:
            self.stats["synack_ignored"] += 1
            return
        self._record_syn(resp, tcp, opts)
        if opts.ts is not None:
            first = flow.synack_ts[0] if flow.synack_ts else opts.ts[0]
            flow.synack_ts = (first, opts.ts[0])
        resp.ack = tcp.ack
        scaling = orig.wscale is not None and resp.wscale is not None
        orig.shift = min(orig.wscale or 0, 14) if scaling else 0
        resp.shift = min(resp.wscale or 0, 14) if scaling else 0
        resp.right_edge = (tcp.ack + tcp.window) & MASK  # windows on SYNs are never scaled
        flow.state = TcpState.SYN_RECV
        self.tcp.touch(flow, now)

    @staticmethod
    def _tsecr_ok(flow: Flow, opts: TcpOptions) -> bool:
        """tcp_check_req (Linux 6.15+): with timestamps on, the ACK that completes the handshake
        must echo a TSval between the first and the last SYN/ACK's, or it is dropped."""
        if not flow.timestamps or opts.ts is None or not opts.ts[1] or flow.synack_ts is None:
            return True
        first, last = flow.synack_ts
        return ((opts.ts[1] - first) & MASK) <= ((last - first) & MASK)

    def _open_stream(self, flow: Flow, start: int | None = None) -> None:
        if flow.resp[1] not in self.protected_tcp or flow.stream is not None:
            return
        if start is None:
            start = flow.halves[1].ack  # the SYN/ACK acknowledged ISN + 1
            if start is None:
                return
        c = self.config
        flow.stream = Reassembler(start, max_held_bytes=c.max_held_bytes,
                                  max_held_segments=c.max_held_segments)

    def _rst(self, fd: FlowDir, flow: Flow, tcp: TCP, now: float,
             events: list[Event]) -> None:
        orig = flow.halves[0]
        if flow.state == TcpState.SYN_SENT:
            ok = fd.dir == 1 and bool(tcp.flags & ACK) and orig.isn is not None \
                and tcp.ack == (orig.isn + 1) & MASK
        else:
            # RFC 5961 as Linux does it: only a RST at exactly rcv_nxt resets (rcv_nxt - 1 once
            # the receiver has taken a FIN); others get a challenge ACK and are ignored.
            fin = fd.snd.fin_seq
            if fd.dir == 0 and flow.stream is not None:
                # The receiver's rcv_nxt: past the FIN once the stream has reached it.
                taken = fin is not None and fin == flow.stream.next_seq
                expected = (flow.stream.next_seq + taken) & MASK
            else:
                taken, expected = fin is not None, fd.snd.next_seq
            ok = expected is None or tcp.seq == expected or \
                (taken and tcp.seq == (expected - 1) & MASK)
        if not ok:
            self.stats["rst_ignored"] += 1
            return
        flow.state = TcpState.CLOSED
        self._close(flow, now)
        events.append(FlowClosed(flow.id, "rst"))

    def _fin(self, fd: FlowDir, flow: Flow, seq: int, plen: int, now: float,
             events: list[Event]) -> None:
        snd = fd.snd
        stream = flow.stream if fd.dir == 0 else None
        if stream is not None and _after(stream.next_seq, (seq + plen) & MASK):
            self.stats["fin_old"] += 1  # before what the receiver has: a duplicate it drops
            return
        edge = fd.rcv.right_edge
        if (stream is not None and self.config.enforce_window and edge is not None
                and not _after(edge, seq)):
            self.stats["fin_beyond_window"] += 1  # the receiver drops it too
            return
        if snd.fin_seq is None:
            snd.fin_seq = (seq + plen) & MASK
            snd.next_seq = (seq + plen + 1) & MASK
        if flow.state == _ESTABLISHED:
            flow.state = TcpState.FIN_WAIT
            self.tcp.touch(flow, now)
        elif flow.state == TcpState.FIN_WAIT and fd.rcv.fin_seq is not None:
            flow.state = TcpState.CLOSING
            self.tcp.touch(flow, now)
        self._maybe_closed(flow, now, events)

    def _maybe_closed(self, flow: Flow, now: float, events: list[Event]) -> None:
        a, b = flow.halves
        if flow.state != TcpState.CLOSING or a.fin_seq is None or b.fin_seq is None:
            return
        if a.ack is not None and b.ack is not None and _after(a.ack, b.fin_seq) \
                and _after(b.ack, a.fin_seq):
            flow.state = TcpState.TIME_WAIT
            self._close(flow, now)
            events.append(FlowClosed(flow.id, "fin"))
