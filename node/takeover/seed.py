"""From what the user-level stack observed to the two endpoints' seeds.

The stack's conntrack keeps, for each direction of a flow, what that endpoint has sent (next
sequence number, last ACK, raw window and its shift, MSS, timestamps, FIN). At the moment of
takeover the node becomes both endpoints:

- towards the client it is the server (``to_client``): it has sent what the server sent, the
  client has acknowledged what the client acknowledged, and it expects the client's bytes from
  the start of the trigger message on (everything before it was forwarded already);
- towards the server it is the client (``to_server``): it has sent everything before the trigger
  (the server acknowledged part of it), and it has received everything the server sent (the node
  forwarded it; the client-facing endpoint owns delivering it from now on).

Windows keep the scale the handshake agreed in each direction and timestamps continue each
impersonated side's clock, so neither peer can tell the difference. In-flight bytes (sent, not
acknowledged) that a peer may still need again come from :class:`StreamTail` copies when the
node kept them; otherwise the endpoint starts with a hole it never invents bytes for.
"""

from __future__ import annotations

import struct

from node.stack.conntrack import Flow, TcpHalf
from node.stack.packet import ACK
from node.takeover.tcp import HALF, MASK, Seed, Segment, seq_add, seq_diff, seq_lt
from node.takeover.wire import build

DEFAULT_MSS = 1460  # unknown MSS (flow picked up mid-stream): the Ethernet one
TS_OPTION = 12  # NOP NOP TS: bytes of options on every segment with timestamps


class StreamTail:
    """The most recent bytes of one direction of a flow, in sequence order, bounded. ``trim``
    forgets what the receiver acknowledged, so a watched flow costs about its bytes in flight."""

    __slots__ = ("data", "end", "limit")

    def __init__(self, limit: int = 256 * 1024) -> None:
        self.limit = limit
        self.end: int | None = None  # sequence number after the last byte held
        self.data = bytearray()

    @property
    def start(self) -> int | None:
        return None if self.end is None else seq_add(self.end, -len(self.data))

    def add(self, seq: int, payload: bytes | memoryview) -> None:
        n = len(payload)
        if not n:
            return
        if self.end is None:
            self.data[:] = payload
            self.end = seq_add(seq, n)
        else:
            d = seq_diff(seq, self.end)
            if d == 0:
                self.data += payload
                self.end = seq_add(self.end, n)
            elif d < 0:
                if n > -d:  # overlaps the end: only the new part counts
                    self.data += payload[-d:]
                    self.end = seq_add(seq, n)
            else:  # a gap: what was held no longer leads to the end
                self.data[:] = payload
                self.end = seq_add(seq, n)
        if len(self.data) > self.limit:
            del self.data[:len(self.data) - self.limit]

    def trim(self, ack: int) -> None:
        """The receiver acknowledged everything before ``ack``."""
        start = self.start
        if start is None:
            return
        k = seq_diff(ack, start)
        if k > 0:
            del self.data[:min(k, len(self.data))]

    def span(self, start: int, stop: int) -> bytes:
        """The known suffix of [start, stop): the bytes held that end exactly at ``stop``."""
        if self.end is None or self.end != stop & 0xFFFFFFFF:
            return b""
        want = seq_diff(stop, start)
        if want <= 0:
            return b""
        return bytes(self.data[-want:]) if want < len(self.data) else bytes(self.data)


def _mss(mss: int | None, ts: bool) -> int:
    return min(mss or DEFAULT_MSS, DEFAULT_MSS) - (TS_OPTION if ts else 0)


def _scaled(h: TcpHalf) -> int:
    return h.window << (h.shift or 0)


def _edge(h: TcpHalf) -> int | None:
    """The right edge ``h`` last advertised; for a flow picked up mid-stream (shift unknown)
    its lower bound, the raw window from its last ACK (the real one is that times 2**shift):
    data past it is cut and resent rather than taken beyond what we know was offered."""
    if h.right_edge is not None or h.ack is None:
        return h.right_edge
    return seq_add(h.ack, h.window)


def seeds(flow: Flow, trigger_seq: int, *, c2s: StreamTail | None = None,
          s2c: StreamTail | None = None) -> tuple[Seed, Seed]:
    """``(to_client, to_server)`` for ``flow`` taken over at ``trigger_seq``: the sequence
    number of the first client byte the node holds back (the trigger message's start)."""
    c, s = flow.halves  # what the client (originator) sent, what the server sent
    ts = c.ts_val is not None and s.ts_val is not None
    trigger_seq &= 0xFFFFFFFF

    # Towards the client, as the server.
    s_next = s.next_seq if s.next_seq is not None else (c.ack or 0)
    server_fin = s.fin_seq is not None
    a_snd_nxt = s.fin_seq if server_fin else s_next  # its FIN is re-sent by the endpoint
    a_snd_una = c.ack if c.ack is not None else a_snd_nxt
    if seq_lt(a_snd_nxt, a_snd_una):
        if server_fin:  # the client has the FIN already; resending it is harmless
            a_snd_una = a_snd_nxt
        else:
            a_snd_nxt = a_snd_una
    to_client = Seed(
        snd_una=a_snd_una, snd_nxt=a_snd_nxt, rcv_nxt=trigger_seq,
        snd_wnd=_scaled(c), snd_shift=c.shift, rcv_shift=s.shift, rcv_adv=_edge(s),
        rcv_raw=s.window, mss=_mss(c.mss, ts),
        ts_val=s.ts_val if ts else None, ts_recent=c.ts_val if ts else None,
        unacked=s2c.span(a_snd_una, a_snd_nxt) if s2c is not None else None,
        sack_ok=flow.sack_permitted)

    # Towards the server, as the client.
    b_snd_una = s.ack if s.ack is not None else trigger_seq
    b_snd_nxt = trigger_seq
    if seq_lt(b_snd_nxt, b_snd_una):  # the server had these bytes already (a late trigger)
        b_snd_nxt = b_snd_una
    to_server = Seed(
        snd_una=b_snd_una, snd_nxt=b_snd_nxt, rcv_nxt=s_next,
        snd_wnd=_scaled(s), snd_shift=s.shift, rcv_shift=c.shift, rcv_adv=_edge(c),
        rcv_raw=c.window, mss=_mss(s.mss, ts),
        ts_val=c.ts_val if ts else None, ts_recent=s.ts_val if ts else None,
        unacked=c2s.span(b_snd_una, b_snd_nxt) if c2s is not None else None,
        peer_fin=server_fin, sack_ok=flow.sack_permitted)
    return to_client, to_server


AckFields = tuple[int, int, int, int | None, int | None]  # seq, ack, window, tsval, tsecr
_ACK_TS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHBBBBII")


def first_ack(flow: Flow, seq: int, n: int, tsecr: int | None,
              client_ack: int | None = None) -> tuple[bytes, AckFields]:
    """The ACK of the ``n``-byte trigger message at ``seq``, as the server would send it, and
    its fields: at the server's next sequence number (``seeds``' ``to_client.snd_nxt``), with
    its last window field and its timestamp clock. Computed from the halves alone, before any
    seed, so it can go out first; ``Endpoint.sent_ack`` then tells the client-facing endpoint
    (``Segment(seq, ack, ACK, window, b"", tsval, tsecr)``). ``client_ack``: the trigger's
    acknowledgement number when the stack has not taken the trigger yet (else the client
    half's).

    One Python call from the flow to the packet (a node woken from sleep runs each call cold,
    ~10 µs): with timestamps, both headers and the option in one ``struct`` call, both checksums
    summed from the field values (2**16 is 1 modulo 0xFFFF, so a 32- or 64-bit field adds its
    16-bit words at once); without, ``wire.build``."""
    c, s = flow.halves
    cack = c.ack if client_ack is None else client_ack
    nxt = s.fin_seq if s.fin_seq is not None else (
        s.next_seq if s.next_seq is not None else (cack or 0))
    # seq_lt and seq_add inline
    if s.fin_seq is None and cack is not None and (nxt - cack) & MASK >= HALF:
        nxt = cack
    nxt &= MASK
    ack = (seq + n) & MASK
    window = s.window & 0xFFFF
    (caddr, cport), (saddr, sport) = flow.orig, flow.resp
    if c.ts_val is None or s.ts_val is None:
        return build(saddr, caddr, sport, cport, Segment(nxt, ack, ACK, window)), (
            nxt, ack, window, None, None)
    tsval, tsecr = s.ts_val & 0xFFFFFFFF, (tsecr or 0) & 0xFFFFFFFF
    addrs = int.from_bytes(saddr + caddr, "big")
    # pseudo header (addresses, protocol, length 32), ports, offset and flags, NOP NOP TS
    tcp_sum = (addrs + 6 + 32 + (sport << 16 | cport) + nxt + ack + (0x8000 | ACK) + window
               + 0x0101080A + tsval + tsecr) % 0xFFFF
    ip_sum = (addrs + 0x4500 + 52 + 0x4000 + 0x4006) % 0xFFFF  # TTL 64, TCP
    return _ACK_TS.pack(0x45, 0, 52, 0, 0x4000, 64, 6, ~ip_sum & 0xFFFF, saddr, caddr, sport,
                        cport, nxt, ack, 0x80, ACK, window, ~tcp_sum & 0xFFFF, 0,
                        1, 1, 8, 10, tsval, tsecr), (nxt, ack, window, tsval, tsecr)
