"""Broadcast wire formats: small fixed-layout datagrams and the fetch stream, by hand with struct.

The overlay shares one UDP port between the Kademlia RPCs (rpcudp frames: first byte 0x00
request, 0x01 response, then a 20-byte message id and msgpack) and the broadcast datagrams
below, told apart by the first byte. Broadcast datagrams carry no msgpack: every field has a
fixed place and size, so a decoder checks the length first and cannot be made to do more work
than reading a few bytes. All integers are big-endian.

Datagrams (version byte 4)::

    ANNOUNCE  0x10 | ver | alert id (32) | token (8) | limit (1) | hops (1) | replica (1)
              | uncovered (20) | n (1) | n x (node id (20) | uncovered (20))   66 + 40n, n <= 4
              [ | body length (2) | body ]                      in all at most 1,200 bytes
    ACK       0x11 | ver | alert id (32) | token (8) | status (1)            43 bytes
    IHAVE     0x12 | ver | flags (1) | n (1) | n alert ids (32 each)       4 + 32n, n <= 16

``token`` binds an acknowledgement to the announcement it answers: the sender makes one up for
each (alert, receiver) pair and the receiver echoes it in its ACKs. A datagram's source can be
forged, but not what was sent to that source: without the token, anyone who knows an alert id
could say "taken" in a contact's name and leave that contact's subtree without the alert.
``limit`` is the announcement's range: the receiver is responsible for the nodes that share at
least ``limit`` leading id bits with it (0: everyone). ``replica`` says which of the sender's
copies of that subtree this is (0 or 1 with two replicas; see ``overlay.broadcast``). ``hops``
is informational (tree depth). ``uncovered`` is a 160-bit mask (big-endian; bit ``g``,
counted from the least significant, stands for group ``g``) of the sender's prefix groups that
nobody covers as far as it knows; the ``n`` entries are older such masks, each relative to the
node id it carries, whose groups neither the sender nor anyone before it could reach (see
``overlay.broadcast``: this is how an alert crosses a sparse routing table).

An announcement may carry the body (the signed envelope) when the whole datagram stays within
``MAX_DATAGRAM``: the receiver then needs no fetch, and acknowledges with an ACK instead. A
Slammer-class alert (one datagram of a few hundred bytes) travels that way; larger ones are
fetched.

Fetch, over a TCP connection to the announcer's address and port (the UDP port number)::

    request   b"HWF" | ver | alert id (32) | requester's UDP port (2)      38 bytes
    reply     status (1) | length (4) | envelope (length bytes)            status 0: found

The requester's UDP port lets the announcer match the fetch to the announcement it sent (the
TCP connection comes from an ephemeral port): a fetch is the receiver's acknowledgement.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

VERSION = 4
ID_LEN = 32
TOKEN_LEN = 8
NO_TOKEN = bytes(TOKEN_LEN)  # for tests and tools that announce by hand
MAX_IHAVE_IDS = 16
MAX_LIMIT = 160  # a 160-bit id space: limit 160 means "nobody below me"
MAX_HOPS = 255

RPC_REQUEST = 0x00
RPC_RESPONSE = 0x01


class Kind(IntEnum):
    ANNOUNCE = 0x10
    ACK = 0x11
    IHAVE = 0x12


class AckStatus(IntEnum):
    TAKEN = 0  # received, fetching, verified or already had it: the subtree is in hand
    REFUTED = 1  # this id did not verify here: the sender should not count on me
    CANNOT_VERIFY = 2  # no image for the service here: I will not forward it (Vigilante)
    FAILED = 3  # I said I had it in hand, but no announcer could give me the body


_ACK_STATUS = {int(s): s for s in AckStatus}  # a dict lookup, not an enum call per datagram
ANNOUNCE_LEN = 66  # with no older masks
REF_LEN = 40
MAX_REFS = 4
MASK_BITS = 160
MAX_REPLICA = 7
# Larger datagrams fragment on a real network (FIELD-NOTES): a body that would take an
# announcement past this is fetched instead.
MAX_DATAGRAM = 1200
ACK_LEN = 43
IHAVE_HEAD = 4
IHAVE_FLAG_REPLY = 0x01  # "tell me what I lack": the receiver answers with its own digest

FETCH_MAGIC = b"HWF"
FETCH_REQUEST_LEN = 38
FETCH_REPLY_HEAD = 5
FETCH_FOUND = 0
FETCH_NOT_HERE = 1

_ANNOUNCE = struct.Struct(">BB32s8sBBB20sB")
_TOKEN_AT = 34  # the token's offset in an announcement
_LIMIT_AT = 42  # the limit's
_REF = struct.Struct(">20s20s")
_ACK = struct.Struct(">BB32s8sB")
_IHAVE = struct.Struct(">BBBB")
_FETCH_REPLY = struct.Struct(">BI")


class Fault(IntEnum):
    """Why a fetch failed, as far as the announcer is concerned."""

    NONE = 0  # the network's doing, or ours (timeout, reset, out of descriptors)
    MALFORMED = 1  # a reply that is not one: the peer's own doing, over its own stream
    REFUSED = 2  # nobody listens where the announcement came from
    NOT_HERE = 3  # "not here" for the id announced from there (if that announcement was its)


class WireError(ValueError):
    """A datagram or stream message that is not valid."""


@dataclass(frozen=True, slots=True)
class Announce:
    alert_id: bytes
    limit: int
    hops: int = 0
    replica: int = 0
    uncovered: int = 0  # the sender's groups nobody covers, as a 160-bit mask
    refs: tuple[tuple[bytes, int], ...] = ()  # (node id, its uncovered mask), oldest last
    body: bytes = b""  # the signed envelope, pushed along (b"": fetch it)
    token: bytes = NO_TOKEN  # echoed in the receiver's acknowledgements


@dataclass(frozen=True, slots=True)
class Ack:
    alert_id: bytes
    status: AckStatus
    token: bytes = NO_TOKEN  # the answered announcement's


@dataclass(frozen=True, slots=True)
class IHave:
    ids: tuple[bytes, ...]
    reply: bool = False


Datagram = Announce | Ack | IHave


def _check_id(alert_id: bytes) -> None:
    if type(alert_id) is not bytes or len(alert_id) != ID_LEN:
        raise WireError(f"an alert id is {ID_LEN} bytes")


def _check_token(token: bytes) -> None:
    if type(token) is not bytes or len(token) != TOKEN_LEN:
        raise WireError(f"a token is {TOKEN_LEN} bytes")


def _mask(bits: int) -> bytes:
    if not 0 <= bits < 1 << MASK_BITS:
        raise WireError("a group mask is 160 bits")
    return bits.to_bytes(MASK_BITS // 8, "big")


def encode(msg: Datagram) -> bytes:
    if isinstance(msg, Announce):
        _check_id(msg.alert_id)
        _check_token(msg.token)
        if not 0 <= msg.limit <= MAX_LIMIT:
            raise WireError(f"limit {msg.limit} outside 0..{MAX_LIMIT}")
        if not 0 <= msg.replica <= MAX_REPLICA:
            raise WireError(f"replica {msg.replica} outside 0..{MAX_REPLICA}")
        if len(msg.refs) > MAX_REFS:
            raise WireError(f"at most {MAX_REFS} older masks")
        for node_id, _ in msg.refs:
            if type(node_id) is not bytes or len(node_id) != 20:
                raise WireError("a node id is 20 bytes")
        body = msg.body
        if body and not fits(len(body), len(msg.refs)):
            raise WireError(f"a pushed body of {len(body)} bytes takes the announcement past "
                            f"{MAX_DATAGRAM} bytes")
        return _ANNOUNCE.pack(Kind.ANNOUNCE, VERSION, msg.alert_id, msg.token, msg.limit,
                              min(msg.hops, MAX_HOPS), msg.replica, _mask(msg.uncovered),
                              len(msg.refs)) + b"".join(
            _REF.pack(node_id, _mask(m)) for node_id, m in msg.refs) + (
            len(body).to_bytes(2, "big") + body if body else b"")
    if isinstance(msg, Ack):
        _check_id(msg.alert_id)
        _check_token(msg.token)
        if msg.status not in _ACK_STATUS:
            raise WireError(f"unknown ack status {msg.status}")
        return _ACK.pack(Kind.ACK, VERSION, msg.alert_id, msg.token, msg.status)
    if isinstance(msg, IHave):
        if len(msg.ids) > MAX_IHAVE_IDS:
            raise WireError(f"at most {MAX_IHAVE_IDS} ids in a digest")
        for i in msg.ids:
            _check_id(i)
        flags = IHAVE_FLAG_REPLY if msg.reply else 0
        return _IHAVE.pack(Kind.IHAVE, VERSION, flags, len(msg.ids)) + b"".join(msg.ids)
    raise TypeError(f"not a broadcast datagram: {type(msg).__name__}")


def fits(body_len: int, refs: int) -> bool:
    """Whether a body of ``body_len`` bytes can ride in an announcement with ``refs`` older
    masks."""
    return ANNOUNCE_LEN + refs * REF_LEN + 2 + body_len <= MAX_DATAGRAM


def with_limit(announce: bytes, limit: int) -> bytes:
    """An encoded announcement with another limit (a node hands several groups over with the
    same announcement but for the limit: encoded once, the others are copies)."""
    if not 0 <= limit <= MAX_LIMIT:
        raise WireError(f"limit {limit} outside 0..{MAX_LIMIT}")
    return b"".join((announce[:_LIMIT_AT], bytes((limit,)), announce[_LIMIT_AT + 1:]))


def with_token(announce: bytes, token: bytes) -> bytes:
    """An encoded announcement with the token of the receiver it goes to."""
    _check_token(token)
    return b"".join((announce[:_TOKEN_AT], token, announce[_TOKEN_AT + TOKEN_LEN:]))


def decode(data: bytes) -> Datagram:
    """Parse one broadcast datagram; ``WireError`` for anything else (never another error)."""
    n = len(data)
    if n < 2:
        raise WireError("datagram too short")
    kind, version = data[0], data[1]
    if version != VERSION:
        raise WireError(f"unsupported version {version}")
    if kind == Kind.ANNOUNCE:
        if n < ANNOUNCE_LEN:
            raise WireError(f"announce of {n} bytes, at least {ANNOUNCE_LEN}")
        _, _, alert_id, token, limit, hops, replica, mask, count = _ANNOUNCE.unpack_from(data)
        end = ANNOUNCE_LEN + count * REF_LEN
        if count > MAX_REFS or n < end:
            raise WireError(f"announce of {n} bytes does not hold {count} older masks")
        body = b""
        if n > end:
            length = int.from_bytes(data[end:end + 2], "big")
            if n > MAX_DATAGRAM or not length or n != end + 2 + length:
                raise WireError(f"announce of {n} bytes does not hold a body of {length}")
            body = bytes(data[end + 2:])
        if limit > MAX_LIMIT:
            raise WireError(f"limit {limit} outside 0..{MAX_LIMIT}")
        if replica > MAX_REPLICA:
            raise WireError(f"replica {replica} outside 0..{MAX_REPLICA}")
        refs = tuple((node_id, int.from_bytes(m, "big")) for node_id, m in
                     (_REF.unpack_from(data, ANNOUNCE_LEN + i * REF_LEN) for i in range(count)))
        return Announce(alert_id, limit, hops, replica, int.from_bytes(mask, "big"), refs,
                        body, token)
    if kind == Kind.ACK:
        if n != ACK_LEN:
            raise WireError(f"ack of {n} bytes, expected {ACK_LEN}")
        _, _, alert_id, token, status = _ACK.unpack(data)
        found = _ACK_STATUS.get(status)
        if found is None:
            raise WireError(f"unknown ack status {status}")
        return Ack(alert_id, found, token)
    if kind == Kind.IHAVE:
        if n < IHAVE_HEAD:
            raise WireError("digest too short")
        _, _, flags, count = _IHAVE.unpack_from(data)
        if count > MAX_IHAVE_IDS or n != IHAVE_HEAD + count * ID_LEN:
            raise WireError(f"digest of {n} bytes does not hold {count} ids")
        if flags & ~IHAVE_FLAG_REPLY:
            raise WireError(f"unknown digest flags {flags:#x}")
        ids = tuple(bytes(data[IHAVE_HEAD + i * ID_LEN: IHAVE_HEAD + (i + 1) * ID_LEN])
                    for i in range(count))
        return IHave(ids, bool(flags & IHAVE_FLAG_REPLY))
    raise WireError(f"unknown datagram kind {kind:#x}")


def encode_fetch_request(alert_id: bytes, port: int) -> bytes:
    _check_id(alert_id)
    if not 0 <= port <= 0xFFFF:
        raise WireError(f"port {port} out of range")
    return FETCH_MAGIC + bytes((VERSION,)) + alert_id + port.to_bytes(2, "big")


def decode_fetch_request(data: bytes) -> tuple[bytes, int]:
    """The alert id asked for and the requester's UDP port."""
    if len(data) != FETCH_REQUEST_LEN or data[:3] != FETCH_MAGIC:
        raise WireError("not a fetch request")
    if data[3] != VERSION:
        raise WireError(f"unsupported fetch version {data[3]}")
    return bytes(data[4:36]), int.from_bytes(data[36:38], "big")


def encode_fetch_reply(body: bytes | None) -> bytes:
    if body is None:
        return _FETCH_REPLY.pack(FETCH_NOT_HERE, 0)
    return _FETCH_REPLY.pack(FETCH_FOUND, len(body)) + body


def decode_fetch_reply_head(head: bytes, max_body: int) -> int | None:
    """Body length that follows, or None if the peer does not have the alert."""
    if len(head) != FETCH_REPLY_HEAD:
        raise WireError("short fetch reply")
    status, length = _FETCH_REPLY.unpack(head)
    if status == FETCH_NOT_HERE:
        if length:
            raise WireError("a not-here reply carries no body")
        return None
    if status != FETCH_FOUND:
        raise WireError(f"unknown fetch status {status}")
    if not 0 < length <= max_body:
        raise WireError(f"body of {length} bytes, at most {max_body}")
    return length
