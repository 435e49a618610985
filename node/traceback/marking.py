"""The hybrid scheme's per-hop rule: log the packet, or mark it, or both; sans-I/O.

The mark lives in the 16-bit IPv4 identification field::

    bit 15     M   marked by a herdwall router (else: whatever the sender put there)
    bit 14     L   the marking router logged this packet
    bits 13-0  ID  the marking router's 14-bit id

Only *atomic* datagrams are marked: DF set, MF clear, offset 0. Their identification field
carries nothing (RFC 6864: it exists for reassembly, and these are never fragmented), so
overwriting it is harmless. Everything else (fragments, packets that may be fragmented later)
keeps its identification and is logged at every hop, as in SPIE.

The rule at a router, for an atomic packet arriving on link ``in`` (the seed's algorithm, with
one change at the edge)::

    trusted = M set, ``in`` faces a traceback router, and ID is that router's id
    trusted and L = 1  -> the upstream logged it: mark only          (write ID=me, L=0)
    otherwise          -> log it in the table of ``in``, and mark    (write ID=me, L=1)
    leaving on an edge link (to hosts), the last hop: clear the field to 0, and log only an
    untrusted arrival

So hops log alternately. Two changes to the seed, which cancel out in storage:

- The seed's ingress only *marks* a packet that arrives from a host; here an untrusted arrival
  is *logged*, so alternation starts at the ingress, and the ingress router plus the very edge
  link the packet came in on are confirmed by a digest, not inferred from the silence of its
  neighbours (where one Bloom-filter false positive makes a false ingress). A forged mark from
  a host is untrusted (wrong link kind), and a router whose upstream's mark is missing (that
  neighbour is down or bypassed: fail-open) logs rather than lose the trail.
- The last hop does not log a trusted arrival: the victim's walk starts there anyway and finds
  the logger among its neighbours or theirs (``node.traceback.query``). A path of n >= 2 hops
  thus logs floor(n/2) packets, as in the seed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MARKED = 0x8000
LOGGED = 0x4000
ID_BITS = 14
ID_MASK = (1 << ID_BITS) - 1

DF = 0x4000  # in the flags/fragment-offset word
MF = 0x2000
OFFSET = 0x1FFF

_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Mark:
    router_id: int
    logged: bool


def encode(router_id: int, logged: bool) -> int:
    if not 0 <= router_id <= ID_MASK:
        raise ValueError(f"router id {router_id} is not a 14-bit number")
    return MARKED | (LOGGED if logged else 0) | router_id


def decode(ident: int) -> Mark | None:
    if not ident & MARKED:
        return None
    return Mark(ident & ID_MASK, bool(ident & LOGGED))


def atomic(frag_word: int) -> bool:
    """DF set, MF clear, offset 0: a datagram that is never fragmented."""
    return frag_word & (DF | MF | OFFSET) == DF


@dataclass(frozen=True, slots=True)
class Decision:
    log: bool
    ident: int | None  # the identification to write, or None to leave the packet alone


LOG_ONLY = Decision(True, None)


def decide(*, frag_word: int, ident: int, my_id: int, upstream_id: int | None,
           last_hop: bool) -> Decision:
    """What this router does with a forwarded packet. ``upstream_id``: the 14-bit id of the
    traceback router on the arrival link, or None if the link faces hosts (or is unknown)."""
    if not atomic(frag_word):
        return LOG_ONLY
    trusted = (upstream_id is not None and ident & MARKED != 0
               and ident & ID_MASK == upstream_id)
    if last_hop:
        return Decision(not trusted, 0)
    log = not (trusted and ident & LOGGED)
    return Decision(log, MARKED | (LOGGED if log else 0) | my_id)


def set_ident(packet: bytearray, ident: int) -> None:
    """Write the identification field and patch the header checksum incrementally (RFC 1624:
    HC' = ~(~HC + ~m + m')), so the rest of the header need not be summed again."""
    old = (packet[4] << 8) | packet[5]
    if old == ident:
        return
    csum = (packet[10] << 8) | packet[11]
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + ident
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    _U16.pack_into(packet, 4, ident)
    _U16.pack_into(packet, 10, ~s & 0xFFFF)
