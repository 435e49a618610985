"""The broadcast core, sans-I/O: a Kademlia tree broadcast of verified alerts.

Inputs are bytes, verdicts and ``now`` (monotonic seconds; ``wall`` unix seconds where an
envelope's signing time is judged); outputs are actions for a thin adapter to carry out:
``Send`` a datagram, ``Fetch`` a body over a stream, ``Verify`` an alert in the sandbox,
``Deliver`` a verified alert to the node, report an ``Unresponsive`` contact. Unit tests drive it
with a fake clock (``tests/overlay/test_broadcast.py``).

The tree (after Czirkos and Hosszú's Kademlia broadcast). A node's contacts fall into groups by
how many leading id bits they share with it: group ``p`` is the subtree of nodes that share
exactly ``p`` bits, so the groups ``p >= L`` together are every node that shares at least ``L``
bits with it. An announcement carries such a range limit ``L``: "you are responsible for every
node that shares ``L`` bits with you". A node that holds a verified alert with limit ``L`` hands
each non-empty group ``p >= L`` to a contact in that group with limit ``p + 1``: exactly that
subtree, which the contact covers in turn.

Two replicas. Every subtree is handed to two contacts so that one dead or lying relay does not
lose it, but if both of them handed every sub-subtree to two more, entries would multiply level
after level (measured on the fake network: 5-6 announcements per node). So an announcement also
carries a replica index ``r`` (0 or 1). The publisher hands every group to two contacts, with
``r = 0`` and ``r = 1``; a node holding replica ``r`` hands each group to one contact, the one
of rank ``r`` in that group. Ranks are the same at every forwarder: contacts sorted by XOR
distance to a point chosen by the alert id (super-peers first), so the two copies of a subtree
enter it at two different nodes, once each, and different alerts enter at different nodes.
When a contact does not acknowledge in time (or answers that it will not
forward), the next contact of that replica's ranks (``r + 2``, ``r + 4``, ...) takes its place,
so the two copies' fallbacks stay apart too. "In time" adapts like TCP's retransmission
timeout: the smoothed acknowledgement delay plus four times its deviation (but at most twice
the delay), between ``ack_timeout`` and ``max_ack_timeout``, so a node whose peers are slow
(or a test machine running a thousand nodes in one process) does not hand subtrees around for
nothing. A node forwards each (replica, range) once; a later announcement with a wider range
makes it hand over only the groups it has not handed over yet.

Sparse tables. A node hands over only its own groups, so where the sender knew nobody in a
group (a chain of nodes that each know only their neighbours) that part of the id space would
wait for anti-entropy. Every announcement therefore carries a mask of the sender's groups that
nobody covers as far as it knows, and the receiver hands each of them that its own contacts
reach to one of those; what it cannot reach either travels on (``_forward``). In a full table
those groups are truly empty: no contact is known in them and no message is added.

Distribution follows Vigilante's rules. An announcement is the alert id in a small datagram; a
node that has not seen the id fetches the body (the signed envelope) from the announcer over a
stream, and that fetch is its acknowledgement. A body small enough to ride in the announcement
(``push_bytes``, within ``wire.MAX_DATAGRAM``: a Slammer-class alert) is pushed along instead;
the receiver then acknowledges with an ACK and needs no fetch, which saves every hop a
connection's round trips. An ACK counts only with the token of the announcement it answers
(``wire``): keyed by a secret of the sender's, per alert and receiver, so nobody else can
answer in a contact's name. Then, in this order: the body must parse and hash
to the announced id, the signature must be good, the signing time recent, and the sandbox (the
injected verifier) must verify the alert. Only then is the alert delivered and forwarded. What
did not verify is never delivered or forwarded, and its id is remembered as refuted, so it costs
nothing when it comes again. A body that does not match its id or its signature is the
announcer's fault, not the id's: the node tries another announcer, and strikes the one that
served it over a fetch stream; three strikes ban an address for ``ban_s``. Nothing that a
datagram's forged source can bring about is a strike: a malformed datagram, a failed fetch
("not here", nobody listening, another service's garbage where a forged announcement pointed),
a pushed body (which only stops that address's pushes being taken for ``ban_s``: they are
fetched, where a lie is the announcer's own).

A node whose verifier has no image for the alert's service (it does not run that service)
cannot verify it, so it does not forward it either; it answers ``CANNOT_VERIFY`` and the sender
gives the subtree to another contact. Super-peers (nodes configured with many service images,
flagged in their signed hello) are tried first in every group, so alerts for services that only
some nodes run still cross the tree through nodes that can check them.

Every announcement and digest is charged to its sender's token bucket before it is parsed, and
every fetch request to the requester's (``admit_fetch``), so no peer can make a node do more
than a bounded amount of work.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import random
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from operator import attrgetter
from typing import Protocol

from overlay import wire
from overlay.antientropy import AntiEntropy
from overlay.limits import KeyedBuckets, Rate
from overlay.seen import SeenCache
from overlay.wire import Ack, AckStatus, Announce, IHave, Kind, WireError
from sca.alert import Alert
from sca.codec import FormatError, decode_alert
from sca.envelope import Envelope, decode_envelope
from sca.keys import NODE_ID_LEN

Addr = tuple[str, int]
NO_RANGE = wire.MAX_LIMIT + 1  # a limit past every group: nothing to forward


@dataclass(frozen=True, slots=True)
class Contact:
    node_id: bytes
    addr: Addr
    super_peer: bool = False
    long_id: int = -1  # the id as an integer, if the caller has it already (-1: computed here)

    def __post_init__(self) -> None:
        if self.long_id < 0:
            object.__setattr__(self, "long_id", int.from_bytes(self.node_id, "big"))


@dataclass(frozen=True, slots=True)
class Send:
    addr: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class Fetch:
    addr: Addr
    alert_id: bytes


@dataclass(frozen=True, slots=True)
class Verify:
    alert_id: bytes
    envelope: Envelope
    alert: Alert | None  # None: not parsed here (``alert_by_verifier``)
    body: bytes  # the envelope as received (for a verifier that checks its signature)


@dataclass(frozen=True, slots=True)
class Deliver:
    alert_id: bytes
    envelope: Envelope
    alert: Alert | None  # None: not parsed here (``alert_by_verifier``)
    hops: int


@dataclass(frozen=True, slots=True)
class Unresponsive:
    contact: Contact


Action = Send | Fetch | Verify | Deliver | Unresponsive


class Outcome(StrEnum):
    VERIFIED = "verified"
    REFUTED = "refuted"  # the alert itself is false or malformed: the id is bad for good
    CANNOT_VERIFY = "cannot-verify"  # no image for its service here
    STALE = "stale"  # signed too long ago (or in the future): a replay
    FORGED = "forged"  # the body does not match the id or its signature: the sender's fault


# Rates are frozen values, safe to share as defaults.
DEFAULT_ANNOUNCE_RATE = Rate(10.0, 20.0)
DEFAULT_FETCH_RATE = Rate(10.0, 20.0)
DEFAULT_DIGEST_REPLY_RATE = Rate(0.2, 2.0)
DEFAULT_STRANGER_PUSH_RATE = Rate(5.0, 20.0)


@dataclass(frozen=True)
class BroadcastConfig:
    replicas: int = 2
    ack_timeout: float = 0.3  # the least time to wait for an acknowledgement
    max_ack_timeout: float = 2.0
    max_tries_per_group: int = 8
    seen_ttl: float = 3600.0
    max_seen: int = 4096
    max_refused: int = 4096
    max_body_bytes: int = 16 << 20
    max_pending: int = 64
    max_announcers: int = 4
    max_fetches_per_peer: int = 2
    announce_rate: Rate = DEFAULT_ANNOUNCE_RATE  # announcements + digests, per peer address
    fetch_rate: Rate = DEFAULT_FETCH_RATE  # fetch requests served, per peer address
    digest_reply_rate: Rate = DEFAULT_DIGEST_REPLY_RATE  # answers to digests, per peer
    # Pushed bodies the sandbox takes from addresses that are no contact's, all together (a
    # forged source costs one run each: this bounds them; the rest are fetched).
    stranger_push_rate: Rate = DEFAULT_STRANGER_PUSH_RATE
    malformed_cost: float = 5.0  # tokens a malformed datagram costs its sender
    strikes_to_ban: int = 3
    ban_s: float = 600.0
    max_age_s: float = 3600.0  # an envelope signed longer ago than this is a replay
    max_skew_s: float = 300.0  # or signed this far in the future
    ae_interval: float = 10.0
    ae_window: float = 600.0
    linger_s: float = 30.0  # how long forwarding state waits for late acknowledgements
    # The injected verifier checks the envelope's signature (before its sandbox, off this
    # process) and answers ``forged`` when it is bad: the core then leaves it out of
    # ``check_body``. Either way nothing is forwarded before the signature has checked out.
    signature_by_verifier: bool = False
    # The verifier parses the alert out of the envelope itself (off this process, and a body
    # that is signed but no alert is refuted there, remembered as refuted like any other):
    # the core then parses no alert at all, and ``Verify`` and ``Deliver`` carry none.
    alert_by_verifier: bool = False
    max_peers_tracked: int = 4096
    # Bodies up to this size ride in the announcements (0: every body is fetched).
    push_bytes: int = wire.MAX_DATAGRAM


class PublishError(ValueError):
    """An envelope this node was asked to publish is not one it may send."""


# A region of the id space: every id that starts with the ``length`` bits of ``value``. Group
# ``g`` of node ``x`` is the region ``(g + 1, (x >> (159 - g)) ^ 1)``.
Region = tuple[int, int]


@dataclass(slots=True)
class _Pending:
    roles: dict[int, int]  # replica index -> widest (smallest) limit asked of us
    hops: int
    # -> the tokens to answer with: its first and its latest (a forged announcement in its
    # name may come before or after the real one: each answer goes once per token, and the
    # sender counts the one that carries its own); none for a digest's peer.
    announcers: dict[Addr, list[bytes]]
    tried: set[Addr] = field(default_factory=set)
    blamed: set[Addr] = field(default_factory=set)
    current: Addr | None = None
    verifying: bool = False
    local: bool = False
    masked: list[tuple[Addr, Announce]] = field(default_factory=list)  # with uncovered groups
    body: bytes | None = None
    served: bool = False  # the body came over a fetch stream to ``current`` (not pushed)
    envelope: Envelope | None = None
    alert: Alert | None = None


@dataclass(slots=True)
class _Held:
    forwarded: list[int]  # per replica index: groups >= this have been handed over
    hops: int
    regions: list[list[Region]]  # per replica index: the regions handed over


# A mask of some node's uncovered groups: (its id, its id as an integer, the mask).
Uncovered = tuple[bytes, int, int]
MAX_MASKED = 8  # announcements with masks kept per pending alert
_NOT_SUPER = 1 << 160  # added to the rank of a contact that is not a super-peer
_ALL = (1 << wire.MASK_BITS) - 1
_LONG_ID = attrgetter("long_id")


def _ack(addr: Addr, alert_id: bytes, status: AckStatus, token: bytes) -> Send:
    return Send(addr, wire.encode(Ack(alert_id, status, token)))


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _Delegation:
    """One copy of one group (subtree) handed over for one alert: the announcement that hands
    it over (encoded once, sent to each candidate in turn), its candidates in rank order, who
    is being asked, who has taken it."""

    __slots__ = ("alert_id", "candidates", "data", "next", "outstanding", "taken", "tries")

    def __init__(self, alert_id: bytes, data: bytes, candidates: list[Contact]) -> None:
        self.alert_id = alert_id
        self.data = data
        self.candidates = candidates
        self.next = 0
        self.tries = 0
        self.outstanding: dict[Addr, tuple[int, Contact, float]] = {}
        self.taken: set[Addr] = set()


def prefix_len(a: int, b: int) -> int:
    """Leading bits two 160-bit ids share (160 for equal ids)."""
    return 160 - (a ^ b).bit_length()


@dataclass(frozen=True, slots=True)
class Checked:
    outcome: Outcome | None  # None: passed every check before the sandbox
    reason: str
    envelope: Envelope | None = None
    alert: Alert | None = None
    enveloped: bool = True  # it decoded as an envelope: only herdwall speaks that


def check_body(alert_id: bytes, body: bytes, wall: float, cfg: BroadcastConfig) -> Checked:
    """Every check before the sandbox, cheapest first; the signature (unless the verifier
    checks it, ``signature_by_verifier``) before the alert's parse (unless the verifier parses
    it, ``alert_by_verifier``)."""
    try:
        envelope = decode_envelope(body)
    except FormatError as exc:
        return Checked(Outcome.FORGED, str(exc), enveloped=False)
    if hashlib.sha256(envelope.alert_bytes).digest() != alert_id:
        return Checked(Outcome.FORGED, "body does not hash to the announced id")
    if not cfg.signature_by_verifier:
        try:
            envelope.check()
        except FormatError as exc:
            return Checked(Outcome.FORGED, str(exc))
    age = wall - envelope.signed_at_s
    if age > cfg.max_age_s or age < -cfg.max_skew_s:
        return Checked(Outcome.STALE, f"signed {age:.0f} s ago")
    if cfg.alert_by_verifier:
        return Checked(None, "", envelope)
    try:
        alert = decode_alert(envelope.alert_bytes)
    except FormatError as exc:
        # Signed, hashes to the id, and still not an alert: the id itself is worthless.
        return Checked(Outcome.REFUTED, str(exc))
    return Checked(None, "", envelope, alert)


class PeerLookup(Protocol):
    """Authenticated peers by address (``overlay.dht.PeerBook``)."""

    def has_ip(self, ip: str) -> bool: ...
    def by_addr(self, addr: Addr) -> object | None: ...


_ACK_STATUS = {Outcome.REFUTED: AckStatus.REFUTED, Outcome.STALE: AckStatus.REFUTED,
               Outcome.CANNOT_VERIFY: AckStatus.CANNOT_VERIFY}


class BroadcastCore:
    def __init__(self, node_id: bytes, contacts: Callable[[], Sequence[Contact]],
                 config: BroadcastConfig | None = None, rng: random.Random | None = None,
                 now: float = 0.0, peers: PeerLookup | None = None,
                 secret: bytes | None = None) -> None:
        """``peers``: the authenticated peers, asked by address for every push and junk
        datagram (the DHT's ``PeerBook``); without it, the contacts are. ``secret`` keys the
        announcements' tokens (default: 16 random bytes from the OS)."""
        if type(node_id) is not bytes or len(node_id) != NODE_ID_LEN:
            raise ValueError(f"node id must be {NODE_ID_LEN} bytes")
        self.node_id = node_id
        self._long = int.from_bytes(node_id, "big")
        self._contacts = contacts
        self.cfg = cfg = config or BroadcastConfig()
        self.rng = rng or random.Random()
        self._secret = secret if secret is not None else os.urandom(16)
        self._good: SeenCache[_Held] = SeenCache(cfg.seen_ttl, cfg.max_seen, cfg.max_body_bytes)
        self._bad: SeenCache[Outcome] = SeenCache(cfg.seen_ttl, cfg.max_refused, 0)
        self._pending: dict[bytes, _Pending] = {}
        self._delegations: dict[bytes, dict[Addr, _Delegation]] = {}
        self._timers: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._announce_buckets = KeyedBuckets(cfg.announce_rate, cfg.max_peers_tracked)
        self._fetch_buckets = KeyedBuckets(cfg.fetch_rate, cfg.max_peers_tracked)
        self._reply_buckets = KeyedBuckets(cfg.digest_reply_rate, cfg.max_peers_tracked)
        self._inflight: Counter[str] = Counter()  # fetches under way, per peer IP
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._wait = cfg.ack_timeout  # ack_wait(), until the first round trip is measured
        self._group_source: Sequence[Contact] | None = None
        self._groups: dict[int, list[Contact]] = {}
        self._group_order: list[int] = []  # the non-empty groups, in order
        self._group_keys: dict[int, list[int]] = {}  # each group's ids, in order
        self._group_bits = 0  # bit p set: some contact in group p
        self._by_addr: dict[Addr, Contact] = {}
        self._strikes: OrderedDict[str, int] = OrderedDict()
        self._banned: OrderedDict[str, float] = OrderedDict()
        self._push_distrust: OrderedDict[str, float] = OrderedDict()  # ip -> until (_blame)
        self._pushes: Counter[str] = Counter()  # pushed bodies in the sandbox, per address
        self._stranger_pushes = KeyedBuckets(cfg.stranger_push_rate, 1)
        self._peers = peers
        self._ports_for: object = None  # the contact list ``_ports`` was built from
        self._ports: dict[str, set[int]] = {}
        self.ae = AntiEntropy(cfg.ae_interval, cfg.ae_window, self.rng, now)
        self.ban_epoch = 0  # bumped whenever the set of banned addresses changes
        self.stats: Counter[str] = Counter()

    # --- queries -----------------------------------------------------------------------------

    def status(self, alert_id: bytes, now: float) -> Outcome | str | None:
        if self._good.get(alert_id, now) is not None:
            return Outcome.VERIFIED
        bad = self._bad.get(alert_id, now)
        if bad is not None:
            return bad
        return "pending" if alert_id in self._pending else None

    def body(self, alert_id: bytes, now: float) -> bytes | None:
        return self._good.body(alert_id, now)

    def recent(self, now: float, limit: int = wire.MAX_IHAVE_IDS) -> list[bytes]:
        return self._good.recent(now, self.cfg.ae_window, limit)

    def banned(self, ip: str, now: float) -> bool:
        until = self._banned.get(ip)
        if until is None:
            return False
        if until <= now:
            del self._banned[ip]
            self.ban_epoch += 1  # the kernel filter follows
            return False
        return True

    def ban(self, ip: str, now: float) -> None:
        """Ban ``ip`` for ``ban_s`` (the DHT layer reports addresses that keep flooding)."""
        self._strikes.pop(ip, None)
        self._banned.pop(ip, None)
        self._banned[ip] = now + self.cfg.ban_s
        while len(self._banned) > self.cfg.max_peers_tracked:
            self._banned.popitem(last=False)
        self.ban_epoch += 1
        self.stats["bans"] += 1

    def banned_ips(self, now: float) -> list[str]:
        """Addresses banned now (expired bans are dropped here, which bumps ``ban_epoch``)."""
        expired = [ip for ip, until in self._banned.items() if until <= now]
        for ip in expired:
            del self._banned[ip]
        if expired:
            self.ban_epoch += 1
        return list(self._banned)

    def next_deadline(self) -> float:
        if self._timers:
            return min(self._timers[0][0], self.ae.next_at)
        return self.ae.next_at

    # --- inputs ------------------------------------------------------------------------------

    def on_datagram(self, addr: Addr, data: bytes, now: float, wall: float) -> list[Action]:
        """A broadcast datagram (first byte 0x10 or more) from ``addr``; ``wall`` judges the
        signing time of a body pushed along."""
        ip = addr[0]
        if self.banned(ip, now):
            self.stats["drop_banned"] += 1
            return []
        kind = data[0] if data else -1
        # Charged before parsing: only the kind byte has been looked at.
        if kind in (Kind.ANNOUNCE, Kind.IHAVE) and not self._announce_buckets.take(ip, now):
            self.stats["drop_rate"] += 1
            return []
        try:
            msg = wire.decode(data)
        except WireError:
            self.stats["drop_malformed"] += 1
            # A datagram's source can be forged: in a contact's name, junk costs only itself
            # (the contact's own datagrams must not be crowded out). From anyone else it is
            # costly, and junk in our own version, which no honest node sends, a ban at once.
            if not self._contact_ip(ip):
                self._announce_buckets.charge(ip, now, self.cfg.malformed_cost)
                if len(data) >= 2 and data[1] == wire.VERSION:
                    self._strike(ip, now, self.cfg.strikes_to_ban)
            return []
        if isinstance(msg, Announce):
            self.stats["rx_announce"] += 1
            return self._on_announce(addr, msg, now, wall)
        if isinstance(msg, Ack):
            self.stats["rx_ack"] += 1
            return self._on_ack(addr, msg, now)
        self.stats["rx_ihave"] += 1
        return self._on_ihave(addr, msg, now)

    def admit_fetch(self, ip: str, now: float) -> bool:
        """May ``ip`` open a fetch now? Asked when the connection is accepted, before reading."""
        if self.banned(ip, now):
            self.stats["fetch_refused_banned"] += 1
            return False
        if not self._fetch_buckets.take(ip, now):
            self.stats["fetch_refused_rate"] += 1
            return False
        return True

    def serve_fetch(self, ip: str, request: bytes, now: float) -> bytes | None:
        """The reply to a fetch request, or None to just close (a malformed request)."""
        try:
            alert_id, port = wire.decode_fetch_request(request)
        except WireError:
            self.stats["fetch_malformed"] += 1
            self._fetch_buckets.charge(ip, now, self.cfg.malformed_cost)
            return None
        self._taken(alert_id, (ip, port), now)
        body = self._good.body(alert_id, now)
        self.stats["fetch_served" if body is not None else "fetch_not_here"] += 1
        return wire.encode_fetch_reply(body)

    def on_fetched(self, alert_id: bytes, addr: Addr, body: bytes | None, now: float,
                   wall: float, fault: int = wire.Fault.NONE) -> list[Action]:
        """The result of a ``Fetch``: the body, or None if it failed, and whose fault that was
        (``wire.Fault``). The announcement that sent us there may have been forged, so what
        answers (or not) counts against the address only as ``_answerable`` allows: nobody
        listening is a ban at once for a stranger, a strike for a contact at its own address
        (it may be restarting); "not here" a strike, from a stranger only (a contact's
        exact address is easily forged on an announcement, and the contact truthfully has no
        such alert); a reply that is none, or a timeout, nobody's provable fault."""
        self._fetch_done(addr[0])
        p = self._pending.get(alert_id)
        if p is None or p.verifying or p.current != addr:
            return []
        if body is None:
            p.tried.add(addr)
            self.stats["fetch_failed"] += 1
            if fault:
                p.blamed.add(addr)
                self.stats[f"fetch_failed_{fault.name.lower()}"] += 1
                if fault == wire.Fault.REFUSED and self._answerable(addr):
                    # A contact's fetch server may be restarting: a strike, not a ban.
                    stranger = not self._contact_ip(addr[0])
                    self._strike(addr[0], now, self.cfg.strikes_to_ban if stranger else 1)
                elif fault == wire.Fault.NOT_HERE and not self._contact_ip(addr[0]):
                    self._strike(addr[0], now)
            return self._next_fetch(alert_id, p, now)
        return self._got_body(alert_id, p, addr, body, now, wall, served=True)

    def _got_body(self, alert_id: bytes, p: _Pending, addr: Addr, body: bytes, now: float,
                  wall: float, served: bool) -> list[Action]:
        """A body from ``addr``, ``served`` over a fetch stream or pushed in a datagram: its
        checks, then the sandbox. What fails is held against the address as ``_blame`` says."""
        p.tried.add(addr)
        p.served = served
        checked = check_body(alert_id, body, wall, self.cfg)
        if checked.outcome is Outcome.FORGED:
            # Cheap checks: a pushed failure cost nothing, a served one is blamed if it is
            # an envelope at all (anything else may be another service where a forged
            # announcement pointed).
            return self._forged(alert_id, p, addr, now, blame=served and checked.enveloped)
        if checked.outcome is not None:
            if checked.outcome is Outcome.REFUTED and served:
                self._blame(p, addr, now)
            return self._settle_bad(alert_id, p, checked.outcome, now)
        assert checked.envelope is not None
        p.verifying = True
        p.body, p.envelope, p.alert = body, checked.envelope, checked.alert
        if not served:
            self._pushes[addr[0]] += 1
        return [Verify(alert_id, checked.envelope, checked.alert, body)]

    def _forged(self, alert_id: bytes, p: _Pending, addr: Addr, now: float,
                blame: bool = True) -> list[Action]:
        # The announcer's fault, not the id's: ask another.
        self.stats["forged"] += 1
        p.blamed.add(addr)
        if blame:
            self._blame(p, addr, now)
        return self._next_fetch(alert_id, p, now)

    def _blame(self, p: _Pending, addr: Addr, now: float) -> None:
        """A forged or refuted envelope from ``addr``. Served over a stream this node opened:
        a strike (``_answerable``). Pushed, after the sandbox (or the verifier's signature
        check) ran on it: its source may be forged, so no strike, but that address's pushed
        bodies are not taken for ``ban_s``: fetched instead, where a lie is its own."""
        if p.served:
            if self._answerable(addr):
                self._strike(addr[0], now)
            return
        self._push_distrust.pop(addr[0], None)
        self._push_distrust[addr[0]] = now + self.cfg.ban_s
        while len(self._push_distrust) > self.cfg.max_peers_tracked:
            self._push_distrust.popitem(last=False)
        self.stats["push_distrusted"] += 1

    def _push_over(self, p: _Pending) -> None:
        """``p``'s sandbox run is over (or forgotten): if it was a push, its address may push
        again (``_takes_push``)."""
        if p.served or p.local or p.current is None:
            return
        ip = p.current[0]
        self._pushes[ip] -= 1
        if self._pushes[ip] <= 0:
            del self._pushes[ip]

    def _contact_ip(self, ip: str) -> bool:
        if self._peers is not None:
            return self._peers.has_ip(ip)
        return ip in self._contact_ports()

    def _contact_at(self, addr: Addr) -> bool:
        if self._peers is not None:
            return self._peers.by_addr(addr) is not None
        return addr[1] in self._contact_ports().get(addr[0], ())

    def _contact_ports(self) -> dict[str, set[int]]:
        """The authenticated contacts' ports by IP (rebuilt when the contact list changes)."""
        contacts = self._contacts()
        if contacts is not self._ports_for:
            ports: dict[str, set[int]] = {}
            for c in contacts:
                ports.setdefault(c.addr[0], set()).add(c.addr[1])
            self._ports_for, self._ports = contacts, ports
        return self._ports

    def _answerable(self, addr: Addr) -> bool:
        """May what ``addr`` did on a stream this node opened count against its IP? Not when
        the IP is a contact's and the port is not the contact's: the announcement that
        pointed there was forged in its name (or another program answered)."""
        return not self._contact_ip(addr[0]) or self._contact_at(addr)

    def _takes_push(self, addr: Addr, now: float) -> bool:
        """Run the sandbox on a body pushed from ``addr``? Not from an address whose push
        failed there lately, a few at a time per address, and from addresses that are no
        contact's exactly (a forged source costs a run) within ``stranger_push_rate``. What
        it does not take is fetched, where a lie is the announcer's own."""
        until = self._push_distrust.get(addr[0])
        if (until is not None and until > now) or \
                self._pushes[addr[0]] >= self.cfg.max_fetches_per_peer:
            return False
        return self._contact_at(addr) or self._stranger_pushes.take(None, now)

    def on_verdict(self, alert_id: bytes, verified: bool | None, now: float,
                   forged: bool = False) -> list[Action]:
        """The sandbox's verdict on a ``Verify``: True, False (refuted), None (cannot tell: no
        image for the service here); ``forged``: the envelope's signature is bad (from a
        verifier that checks it, ``signature_by_verifier``)."""
        p = self._pending.get(alert_id)
        if p is None or not p.verifying:
            return []
        self._push_over(p)
        if forged:
            p.verifying = False
            if p.local:  # our own envelope: nobody to blame, nothing to send
                del self._pending[alert_id]
                self.stats["forged"] += 1
                return []
            assert p.current is not None
            return self._forged(alert_id, p, p.current, now)
        if verified is not True:
            outcome = Outcome.CANNOT_VERIFY if verified is None else Outcome.REFUTED
            if outcome is Outcome.REFUTED and p.current is not None:
                self._blame(p, p.current, now)
            return self._settle_bad(alert_id, p, outcome, now)
        del self._pending[alert_id]
        assert p.envelope is not None
        self.stats["verified"] += 1
        held = _Held([NO_RANGE] * self.cfg.replicas, p.hops,
                     [[] for _ in range(self.cfg.replicas)])
        self._good.put(alert_id, held, now, body=p.body)
        actions: list[Action] = []
        if not p.local:
            actions.append(Deliver(alert_id, p.envelope, p.alert, p.hops))
        for replica, limit in sorted(p.roles.items()):
            masks = [m for addr, ann in p.masked if ann.replica % self.cfg.replicas == replica
                     for m in self._masks(addr, ann)]
            actions += self._forward(alert_id, held, replica, limit, now, masks)
        return actions

    def publish(self, envelope_bytes: bytes, now: float, wall: float
                ) -> tuple[bytes, list[Action]]:
        """Broadcast an alert this node made. It goes through the same checks as any other
        (the sandbox included, via the ``Verify`` action) before it is sent anywhere."""
        if not isinstance(envelope_bytes, bytes):
            raise PublishError("an envelope is bytes")
        try:
            alert_bytes = decode_envelope(envelope_bytes).alert_bytes
        except FormatError as exc:
            raise PublishError(str(exc)) from None
        alert_id = hashlib.sha256(alert_bytes).digest()
        checked = check_body(alert_id, envelope_bytes, wall, self.cfg)
        if checked.outcome is not None:
            raise PublishError(f"{checked.outcome.value}: {checked.reason}")
        if self._good.get(alert_id, now) is not None:
            return alert_id, []  # already out
        self._bad.discard(alert_id)  # our own sandbox gets the last word on our own alert
        old = self._pending.pop(alert_id, None)
        if old is not None and old.verifying:
            self._push_over(old)  # its verdict will find our own pending instead
        roles = dict.fromkeys(range(self.cfg.replicas), 0)  # every copy of everything
        p = _Pending(roles=roles, hops=0, announcers=old.announcers if old else {}, local=True,
                     verifying=True, body=envelope_bytes, envelope=checked.envelope,
                     alert=checked.alert)
        self._pending[alert_id] = p
        assert checked.envelope is not None
        return alert_id, [Verify(alert_id, checked.envelope, checked.alert, envelope_bytes)]

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, what, payload = heapq.heappop(self._timers)
            if what == "ack":
                alert_id, addr, token = payload  # type: ignore[misc]
                actions += self._ack_timeout(alert_id, addr, token, now)
            elif what == "purge":
                self._delegations.pop(payload, None)  # type: ignore[arg-type]
        if self.ae.due(now):
            peer = self.ae.start_round(now, self._contacts())
            if peer is not None:
                self.stats["ae_rounds"] += 1
                actions.append(Send(peer.addr,
                                    wire.encode(IHave(tuple(self.recent(now)), True))))
        return actions

    # --- internals ---------------------------------------------------------------------------

    def _token(self, alert_id: bytes, addr: Addr) -> bytes:
        """The token of our announcements of ``alert_id`` to ``addr``: worked out again for
        the answer, not kept."""
        return hashlib.blake2b(f"{addr[0]}|{addr[1]}".encode() + alert_id, key=self._secret,
                               digest_size=wire.TOKEN_LEN).digest()

    def _timer(self, when: float, what: str, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, what, payload))

    def _on_announce(self, addr: Addr, ann: Announce, now: float, wall: float
                     ) -> list[Action]:
        aid = ann.alert_id
        replica = ann.replica % self.cfg.replicas
        held = self._good.get(aid, now)
        if held is not None:
            actions: list[Action] = [_ack(addr, aid, AckStatus.TAKEN, ann.token)]
            if ann.limit < held.forwarded[replica] or ann.uncovered or ann.refs:
                actions += self._forward(aid, held, replica, ann.limit, now,
                                         self._masks(addr, ann))
            return actions
        bad = self._bad.get(aid, now)
        if bad is not None:
            self.stats["rx_announce_refused"] += 1
            return [_ack(addr, aid, _ACK_STATUS.get(bad, AckStatus.REFUTED), ann.token)]
        p = self._pending.get(aid)
        if p is not None:
            p.roles[replica] = min(p.roles.get(replica, NO_RANGE), ann.limit)
            p.hops = min(p.hops, ann.hops)
            tokens = p.announcers.get(addr)
            if tokens is None:
                if len(p.announcers) < self.cfg.max_announcers:
                    p.announcers[addr] = [ann.token]
            elif ann.token not in tokens:
                tokens[1:] = [ann.token]
            if (ann.uncovered or ann.refs) and len(p.masked) < MAX_MASKED:
                p.masked.append((addr, ann))
            return [_ack(addr, aid, AckStatus.TAKEN, ann.token)]
        body = ann.body
        if body and not self._takes_push(addr, now):
            self.stats["push_ignored"] += 1
            body = b""  # fetched from it instead
        if body:
            actions = self._start_pushed(aid, addr, {replica: ann.limit}, ann.hops, ann.token)
        else:
            actions = self._start_fetch(aid, addr, {replica: ann.limit}, ann.hops, ann.token)
        if actions and (ann.uncovered or ann.refs):
            self._pending[aid].masked.append((addr, ann))
        if body and actions:
            self.stats["rx_pushed"] += 1
            got = self._got_body(aid, self._pending[aid], addr, body, now, wall, served=False)
            # The sandbox's run before the acknowledgement: on every hop of a chain, the
            # verifier's job goes out first. A bad body's answers come after it, as after a fetch.
            actions = got + actions if got and type(got[0]) is Verify else actions + got
        return actions

    def _start_pushed(self, aid: bytes, addr: Addr, roles: dict[int, int], hops: int,
                      token: bytes) -> list[Action]:
        """An announcement that brought its body: acknowledged at once (no fetch will),
        before the body's checks, as a fetch would be."""
        if len(self._pending) >= self.cfg.max_pending:
            self.stats["drop_busy"] += 1
            return []
        self._pending[aid] = _Pending(roles=roles, hops=hops, announcers={addr: [token]},
                                      current=addr)
        return [_ack(addr, aid, AckStatus.TAKEN, token)]

    def _start_fetch(self, aid: bytes, addr: Addr, roles: dict[int, int], hops: int,
                     token: bytes | None) -> list[Action]:
        # No acknowledgement when busy: the sender gives the subtree to someone else.
        if len(self._pending) >= self.cfg.max_pending:
            self.stats["drop_busy"] += 1
            return []
        if self._inflight[addr[0]] >= self.cfg.max_fetches_per_peer:
            # One peer cannot fill the pending table with ids it will never serve.
            self.stats["drop_busy_peer"] += 1
            return []
        self._pending[aid] = _Pending(roles=roles, hops=hops,
                                      announcers={addr: [] if token is None else [token]},
                                      current=addr)
        return self._fetch(addr, aid)

    def _fetch(self, addr: Addr, aid: bytes) -> list[Action]:
        self._inflight[addr[0]] += 1
        self.stats["fetches"] += 1
        return [Fetch(addr, aid)]

    def _fetch_done(self, ip: str) -> None:
        n = self._inflight.get(ip, 0) - 1
        if n > 0:
            self._inflight[ip] = n
        else:
            self._inflight.pop(ip, None)

    def _next_fetch(self, aid: bytes, p: _Pending, now: float) -> list[Action]:
        for addr in p.announcers:
            if (addr not in p.tried and not self.banned(addr[0], now)
                    and self._inflight[addr[0]] < self.cfg.max_fetches_per_peer):
                p.current = addr
                return self._fetch(addr, aid)
        del self._pending[aid]  # nobody could give it: a later announcement may
        self.stats["fetch_gave_up"] += 1
        if not p.roles:
            return []  # a digest's id: nobody handed us a subtree for it
        # Those told "taken" (and those whose fetch counted as that) must not count on us;
        # announcers caught lying get nothing.
        return [_ack(a, aid, AckStatus.FAILED, token) for a, tokens in p.announcers.items()
                if a not in p.blamed and not self.banned(a[0], now) for token in tokens]

    def _settle_bad(self, aid: bytes, p: _Pending, outcome: Outcome, now: float
                    ) -> list[Action]:
        del self._pending[aid]
        self.stats[outcome.value] += 1
        self._bad.put(aid, outcome, now)
        status = _ACK_STATUS.get(outcome, AckStatus.REFUTED)
        # Tell every announcer, so an honest one gives the subtree to another contact.
        return [_ack(a, aid, status, token) for a, tokens in p.announcers.items()
                for token in tokens]

    def _on_ack(self, addr: Addr, ack: Ack, now: float) -> list[Action]:
        aid = ack.alert_id
        if (aid not in self._delegations and aid not in self._pending
                and self._good.get(aid, now) is None and self._bad.get(aid, now) is None):
            # Nodes acknowledge only what we announced, and we hold what we announce for
            # ``seen_ttl``: an acknowledgement of an id we never heard of is made up (by
            # whom, a datagram cannot say: dropped, no strike).
            self.stats["ack_unknown"] += 1
            return []
        if not hmac.compare_digest(ack.token, self._token(aid, addr)):
            # Not an answer to anything we sent there: made up by someone who knows the id
            # (dropped, no strike: its source may be forged too).
            self.stats["ack_forged"] += 1
            return []
        if ack.status is AckStatus.TAKEN:
            self._taken(ack.alert_id, addr, now)
            return []
        d = self._delegations.get(ack.alert_id, {}).get(addr)
        if d is None:
            return []
        if d.outstanding.pop(addr, None) is None:
            if addr not in d.taken:
                return []
            d.taken.discard(addr)
        self.stats["refused_delegation"] += 1
        return self._launch(d, now)

    def unsettled(self, alert_id: bytes, now: float) -> int | None:
        """How many of this node's announcements of ``alert_id`` still wait for their contact
        to fetch or acknowledge it (a refusal or a timeout passes the subtree to the next
        candidate, who then waits); None while it has not verified here."""
        if self._good.get(alert_id, now) is None:
            return None
        dels = self._delegations.get(alert_id)
        return 0 if not dels else sum(addr in d.outstanding for addr, d in dels.items())

    def _taken(self, alert_id: bytes, addr: Addr, now: float) -> None:
        d = self._delegations.get(alert_id, {}).get(addr)
        if d is None:
            return
        entry = d.outstanding.pop(addr, None)
        if entry is not None:
            d.taken.add(addr)
            self._rtt_sample(now - entry[2])

    def _rtt_sample(self, sample: float) -> None:
        # RFC 6298's estimator (alpha 1/8, beta 1/4).
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar += (abs(self._srtt - sample) - self._rttvar) / 4
            self._srtt += (sample - self._srtt) / 8
        # TCP's RTO, but never past twice the smoothed delay: there a spurious timeout costs a
        # congestion collapse, here one more announcement, while waiting too long on a dead
        # contact holds up its whole subtree (a noisy history, such as the RPCs of a crowded
        # join, would otherwise keep the deviation term high long after). Kept, not worked
        # out for every announcement.
        wait = min(self._srtt + 4 * self._rttvar, 2 * self._srtt)
        self._wait = min(self.cfg.max_ack_timeout, max(self.cfg.ack_timeout, wait))

    def rtt_sample(self, seconds: float) -> None:
        """A round trip measured elsewhere (the DHT's RPCs): the adapter feeds these in so the
        first broadcast already waits about as long as peers take to answer."""
        if 0 <= seconds <= 60:
            self._rtt_sample(seconds)

    def ack_wait(self) -> float:
        """How long to wait for an acknowledgement now."""
        return self._wait

    def _ack_timeout(self, alert_id: bytes, addr: Addr, token: int, now: float
                     ) -> list[Action]:
        d = self._delegations.get(alert_id, {}).get(addr)
        if d is None:
            return []
        entry = d.outstanding.get(addr)
        if entry is None or entry[0] != token:
            return []
        del d.outstanding[addr]
        self.stats["ack_timeouts"] += 1
        return [Unresponsive(entry[1]), *self._launch(d, now)]

    def unreachable(self, addr: Addr, now: float) -> list[Action]:
        """Nobody listens at ``addr`` (an ICMP "port unreachable" came back for a datagram we
        sent there): whatever it was asked to take is handed to the next candidate now, not
        at the acknowledgement timeout, and it counts as unresponsive as a timeout would."""
        actions: list[Action] = []
        for dels in self._delegations.values():
            d = dels.get(addr)
            entry = d.outstanding.pop(addr, None) if d is not None else None
            if d is not None and entry is not None:
                self.stats["unreachable"] += 1
                actions += [Unresponsive(entry[1]), *self._launch(d, now)]
        return actions

    def _forward(self, aid: bytes, held: _Held, replica: int, limit: int, now: float,
                 masks: Sequence[Uncovered] = ()) -> list[Action]:
        """Hand copy ``replica`` of the groups ``limit <= p < held.forwarded[replica]`` over,
        and of whatever parts of the ``masks`` (groups nobody covers, as far as the nodes
        before us knew) our contacts reach.

        Why the masks: a node hands over only its own groups, so in a sparse table (a chain
        of nodes that know only their neighbours) a part of the id space the sender knew
        nobody in would be lost, although a node further on may know someone there. So every
        announcement says which of the sender's groups nobody covers, and the receiver hands
        each such region to a contact of its own inside it (limit ``g + 1`` relative to that
        contact is exactly the sender's group ``g``). What it cannot reach either travels on:
        as its own groups where the region is one, else as the older node's mask (at most
        ``wire.MAX_REFS`` of them). In a full table those groups are truly empty, nobody knows
        a contact in them, and no message is added; they cost bytes, not datagrams.
        """
        upper = held.forwarded[replica]
        groups = self._grouped()
        me = self._long
        chosen: dict[Region, list[Contact]] = {}
        if limit < upper:
            held.forwarded[replica] = limit
            for p in self._group_order:
                if p >= upper:
                    break
                if p >= limit:
                    chosen[(p + 1, (me >> (159 - p)) ^ 1)] = groups[p]
        lim = held.forwarded[replica]
        # Our own groups in range that we know nobody in.
        uncovered = _ALL >> lim << lim & ~self._group_bits
        left: list[tuple[bytes, int]] = []
        for node_id, x, mask in masks:
            j = 160 - (me ^ x).bit_length()
            if j >= 160:
                continue
            # Its groups below ``j`` are ours too; ours from ``lim`` on are in hand already.
            low = mask & ((1 << min(j, lim)) - 1)
            while low:
                bit = low & -low
                low ^= bit
                g = bit.bit_length() - 1
                members = groups.get(g)
                if members is not None:
                    chosen.setdefault((g + 1, (me >> (159 - g)) ^ 1), members)
                else:
                    uncovered |= bit
            # Its groups above ``j`` lie inside our group ``j`` (it is on that side of us).
            high = mask >> (j + 1) << (j + 1) if j < lim else 0
            if high and j in groups:
                keys, members = self._group_keys[j], groups[j]
                # A group deeper than the most bits any of our contacts shares with it holds
                # none of them; the others are id ranges, looked up by bisection.
                i = bisect_left(keys, x)
                k = i + 1 if i < len(keys) and keys[i] == x else i  # not the node itself
                deepest = max(prefix_len(x, keys[i - 1]) if i else 0,
                              prefix_len(x, keys[k]) if k < len(keys) else 0)
                for g in _bits(high & ((2 << deepest) - 1)):
                    shift = 159 - g
                    lo = ((x >> shift) ^ 1) << shift
                    a, b = bisect_left(keys, lo), bisect_left(keys, lo + (1 << shift))
                    if a < b:
                        chosen.setdefault((g + 1, lo >> shift), members[a:b])
                        high &= ~(1 << g)
            if high:
                left.append((node_id, high))
        if not chosen:
            return []
        if aid not in self._delegations:
            self._delegations[aid] = {}
            self._timer(now + self.cfg.linger_s, "purge", aid)
        target = int.from_bytes(aid[:20], "big")
        r = self.cfg.replicas
        actions: list[Action] = []
        done = held.regions[replica]
        data = b""
        body = self._good.body(aid, now) or b""
        refs = tuple(left[:wire.MAX_REFS])
        if len(body) > self.cfg.push_bytes or not wire.fits(len(body), len(refs)):
            body = b""
        # Widest regions first, so a region inside one already handed over is skipped.
        for reg in sorted(chosen):
            n, v = reg
            if any(n >= m and v >> (n - m) == w for m, w in done):
                continue
            done.append(reg)
            # Super-peers first, then by XOR distance to the target (one integer per contact).
            ranked = sorted(chosen[reg], key=lambda c: c.long_id ^ target
                            | (0 if c.super_peer else _NOT_SUPER))
            # This copy's own ranks first, then the rest: a group smaller than the number of
            # copies still gets every copy (its members are the only way into it).
            mine = ranked[replica::r]
            rest = [c for i, c in enumerate(ranked) if i % r != replica]
            # The announcements of one call differ in their limit only: encoded once.
            data = (wire.with_limit(data, n) if data else wire.encode(Announce(
                aid, n, held.hops + 1, replica, uncovered, refs, body)))
            actions += self._launch(_Delegation(aid, data, mine + rest), now)
        return actions

    def _masks(self, addr: Addr, ann: Announce) -> list[Uncovered]:
        """An announcement's masks of uncovered groups with the ids they are relative to. The
        sender's own id comes from our authenticated contacts, never from the datagram; the
        older ids do come from it, which gives a liar nothing it could not get by setting
        every bit of its own mask: each contact is asked at most once per alert."""
        out: list[Uncovered] = []
        self._grouped()  # the address index follows the table
        sender = self._by_addr.get(addr) if ann.uncovered else None
        if sender is not None:
            out.append((sender.node_id, sender.long_id, ann.uncovered))
        out += [(node_id, int.from_bytes(node_id, "big"), m) for node_id, m in ann.refs if m]
        return out

    def _grouped(self) -> dict[int, list[Contact]]:
        """Contacts by prefix group, each group in id order, recomputed only when the adapter
        hands over a new list (it hands over the same list object while its routing table is
        unchanged)."""
        contacts = self._contacts()
        if contacts is not self._group_source:
            me = self._long
            groups: dict[int, list[Contact]] = {}
            # A group is a range of ids: taken in id order, each group comes out sorted.
            for c in sorted(contacts, key=_LONG_ID):
                p = 160 - (me ^ c.long_id).bit_length()
                if p < 160:
                    groups.setdefault(p, []).append(c)
            self._group_source, self._groups = contacts, groups
            self._group_order = sorted(groups)
            self._group_keys = {p: [c.long_id for c in m] for p, m in groups.items()}
            self._group_bits = sum(1 << p for p in groups)
            self._by_addr = {c.addr: c for c in contacts}
        return self._groups

    def _launch(self, d: _Delegation, now: float) -> list[Action]:
        """Ask the next candidate of ``d`` unless one is being asked or has it already."""
        dels = self._delegations.get(d.alert_id)
        if dels is None or d.outstanding or d.taken:  # purged: too late to start anything
            return []
        cfg = self.cfg
        while d.next < len(d.candidates) and d.tries < cfg.max_tries_per_group:
            c = d.candidates[d.next]
            d.next += 1
            if c.addr in dels:  # already asked for another copy or group (a stale table)
                continue
            d.tries += 1
            self._seq += 1
            token = self._seq
            d.outstanding[c.addr] = (token, c, now)
            dels[c.addr] = d
            self._timer(now + self._wait, "ack", (d.alert_id, c.addr, token))
            self.stats["tx_announce"] += 1
            return [Send(c.addr, wire.with_token(d.data, self._token(d.alert_id, c.addr)))]
        self.stats["group_exhausted"] += 1
        return []

    def _on_ihave(self, addr: Addr, msg: IHave, now: float) -> list[Action]:
        actions: list[Action] = []
        first = True
        for aid in msg.ids:
            if (aid in self._pending or self._good.get(aid, now) is not None
                    or self._bad.get(aid, now) is not None):
                continue
            # Each id we would fetch costs a token like an announcement (the first was paid
            # on receipt): sixteen made-up ids cannot buy sixteen fetches.
            if not first and not self._announce_buckets.take(addr[0], now):
                self.stats["drop_rate"] += 1
                break
            first = False
            started = self._start_fetch(aid, addr, {}, wire.MAX_HOPS, None)
            self.stats["ae_repairs"] += bool(started)
            actions += started
        # At most one answer per peer per few seconds: an honest neighbour asks once an
        # interval, and a flood of asking digests must not turn this node into an amplifier.
        # Nor while it still owes us bodies it claims to hold (a made-up digest's sender,
        # found out when the fetch fails); an honest peer gets its answer next round.
        if msg.reply and not actions and self._reply_buckets.take(addr[0], now):
            lacking = AntiEntropy.lacking(msg.ids, self.recent(now))
            if lacking:
                actions.append(Send(addr, wire.encode(IHave(lacking, False))))
        return actions

    def _strike(self, ip: str, now: float, weight: int = 1) -> None:
        n = self._strikes.pop(ip, 0) + weight
        self._strikes[ip] = n
        while len(self._strikes) > self.cfg.max_peers_tracked:
            self._strikes.popitem(last=False)
        self.stats["strikes"] += 1
        if n >= self.cfg.strikes_to_ban:
            self.ban(ip, now)
