"""Kademlia membership: the ``kademlia`` library (2.2.3), hardened by subclassing.

What the library gets wrong for a hostile network, and what the subclasses here do instead
(``/work/shared/FIELD-NOTES.md`` has the measurements):

- No authentication. A contact enters the routing table only after a signed hello
  (``overlay.hello``: key hashes to the id, fresh nonce, address signed) and at most
  ``max_ids_per_ip`` ids per IP address are admitted.
- Handlers trust arguments and replies. Every request is checked against a schema (types,
  sizes, 20-byte ids, IP literals, ports) before its handler runs, and every reply before the
  library's crawler sees it; a malformed reply counts as no reply, so nothing raises out of
  ``bootstrap`` or a lookup. Requests are answered inline (no task per datagram) and every
  handler, timer and task is wrapped so nothing surfaces as an unhandled task exception.
- Expensive rejection. Datagrams over ``MAX_DATAGRAM`` bytes and datagrams from an address over
  its token bucket are dropped before any parsing; malformed ones cost their sender extra tokens.
- ``store`` is open and unbounded: it is not served at all (the overlay stores nothing in the
  DHT), and ``Server.set``/``get`` refuse.
- ``save_state``/``load_state`` use pickle: they refuse; ``overlay.neighbours`` keeps a JSON
  neighbour cache instead.
- One missed reply evicts a contact: here three consecutive misses do.
- The kernel's default receive buffer overflows in lookup bursts: the socket asks for
  ``rcvbuf`` bytes with SO_RCVBUFFORCE (plain SO_RCVBUF is capped by ``rmem_max``) and logs the
  size in effect.
- A datagram to a dead node is only known lost when its reply fails to come. The socket asks
  the kernel for ICMP errors (``IP_RECVERR``): a "port unreachable" names the address nobody
  listens at, and ``on_unreachable`` hears of it at once (the broadcast moves on without
  waiting out its acknowledgement timeout).
- Tables do not fill from bootstrap alone: a few seconds after joining (again at doubling
  intervals), a minute after, and every ``refresh_s`` after, the node looks up a random id in
  each prefix group (``refresh_groups``).

Broadcast datagrams (first byte 0x10 and up, ``overlay.wire``) share the socket and go to the
``on_broadcast`` callback after the same size and rate checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import random
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from overlay import hello as hello_mod
from overlay import kfilter, mpack
from overlay.limits import KeyedBuckets, Rate
from overlay.wire import RPC_REQUEST, RPC_RESPONSE
from sca.keys import NODE_ID_LEN, NodeKey

SO_MARK = getattr(socket, "SO_MARK", 36)
log = logging.getLogger(__name__)

Addr = tuple[str, int]
# Anything over ~1,200 bytes fragments on a real network; the largest honest datagram is a
# find_node reply with 20 IPv6 contacts (~1.3 KB).
MAX_DATAGRAM = 1400
_HEAD = 21  # rpcudp: kind byte + 20-byte message id
ABUSE_WINDOW_S = 30.0  # over-rate drops further apart than this are separate episodes
_NO_REPLY = object()
_TX_KEYS = [f"tx_{kind:#04x}" for kind in range(256)]  # stats keys per first byte
_DEFAULT_DATAGRAM_RATE = Rate(200.0, 400.0)
_DEFAULT_HELLO_RATE = Rate(20.0, 40.0)
# Linux's extended socket errors (linux/in.h, linux/in6.h, linux/errqueue.h).
IP_RECVERR = 11
IPV6_RECVERR = 25
_EE_ORIGIN_ICMP = 2
_EE_ORIGIN_ICMP6 = 3
# What an ICMP error leaves pending on the socket for the next call to report.
_ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                          errno.EHOSTDOWN, errno.EPROTO, errno.EMSGSIZE})
_PORT_UNREACHABLE = {_EE_ORIGIN_ICMP: (3, 3), _EE_ORIGIN_ICMP6: (1, 4)}  # origin: (type, code)


@dataclass(frozen=True)
class DhtConfig:
    ksize: int = 20
    alpha: int = 3
    rpc_timeout: float = 2.0
    misses_to_evict: int = 3
    max_ids_per_ip: int = 2
    datagram_rate: Rate = _DEFAULT_DATAGRAM_RATE  # every datagram, per source IP
    hello_rate: Rate = _DEFAULT_HELLO_RATE  # hellos this node starts, per target IP
    malformed_cost: float = 20.0
    # An address is reported for a ban after this many datagrams over its rate, or this many
    # malformed ones (not an authenticated peer's address: junk is cheap to forge).
    abuse_drops: int = 200
    abuse_sustained_s: float = 3.0  # ... over the rate for this long at least
    malformed_to_ban: int = 3
    max_hellos_inflight: int = 256
    rcvbuf: int = 4 << 20
    socket_mark: int | None = None  # SO_MARK on the node's sockets (the host's firewall exempts it)
    refresh_s: float = 900.0
    first_refresh_s: float = 60.0
    # Passes before the first: after this many seconds, then at doubling intervals (0: none).
    # Nodes started together join through peers that know nobody yet (or not yet listening):
    # without these they waited the whole first_refresh_s for each other.
    early_refresh_s: float = 2.0
    refresh_k: int = 4
    max_peers: int = 4096
    super_peer: bool = False


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: bytes
    addr: Addr
    flags: int

    @property
    def super_peer(self) -> bool:
        return bool(self.flags & hello_mod.FLAG_SUPER_PEER)


class PeerBook:
    """Peers whose hello checked out: node id <-> address, bounded (least recently proven go)."""

    def __init__(self, max_ids_per_ip: int, max_peers: int) -> None:
        self.max_ids_per_ip = max_ids_per_ip
        self.max_peers = max_peers
        self._by_id: OrderedDict[bytes, Peer] = OrderedDict()
        self._by_addr: dict[Addr, bytes] = {}
        self._per_ip: Counter[str] = Counter()

    def get(self, node_id: bytes) -> Peer | None:
        return self._by_id.get(node_id)

    def by_addr(self, addr: Addr) -> Peer | None:
        node_id = self._by_addr.get(addr)
        return None if node_id is None else self._by_id.get(node_id)

    def has_ip(self, ip: str) -> bool:
        """Is some authenticated peer at this address?"""
        return ip in self._per_ip

    def room_for(self, node_id: bytes, addr: Addr) -> bool:
        old = self._by_id.get(node_id)
        if old is not None and old.addr[0] == addr[0]:
            return True
        if self._by_addr.get(addr) is not None:
            return True  # replaces whoever was at that address
        return self._per_ip[addr[0]] < self.max_ids_per_ip

    def add(self, peer: Peer) -> list[Peer]:
        """Record ``peer``; returns the peers it displaced (same address, or evicted)."""
        gone: list[Peer] = []
        old_id = self._by_addr.get(peer.addr)
        if old_id is not None and old_id != peer.node_id:
            gone.append(self._remove(old_id))
        if peer.node_id in self._by_id:
            self._remove(peer.node_id)
        self._by_id[peer.node_id] = peer
        self._by_addr[peer.addr] = peer.node_id
        self._per_ip[peer.addr[0]] += 1
        while len(self._by_id) > self.max_peers:
            gone.append(self._remove(next(iter(self._by_id))))
        return gone

    def _remove(self, node_id: bytes) -> Peer:
        peer = self._by_id.pop(node_id)
        if self._by_addr.get(peer.addr) == node_id:
            del self._by_addr[peer.addr]
        self._per_ip[peer.addr[0]] -= 1
        if self._per_ip[peer.addr[0]] <= 0:
            del self._per_ip[peer.addr[0]]
        return peer

    def discard(self, node_id: bytes) -> None:
        if node_id in self._by_id:
            self._remove(node_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterable[Peer]:  # type: ignore[override]
        return iter(list(self._by_id.values()))


# --- argument and reply schemas -------------------------------------------------------------


def _is_id(v: object) -> bool:
    return type(v) is bytes and len(v) == NODE_ID_LEN


def _valid_ip(v: object) -> bool:
    # inet_pton: strict literals only (no "127.1", no hostnames), and ten times faster than
    # the ipaddress module, which showed in profiles of a thousand nodes joining.
    if type(v) is not str or not 0 < len(v) <= hello_mod.MAX_HOST_LEN:
        return False
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in v else socket.AF_INET, v)
    except (OSError, ValueError):
        return False
    return True


def _valid_port(v: object) -> bool:
    return type(v) is int and 0 < v <= 0xFFFF


def valid_node_list(raw: object, ksize: int) -> list[tuple[bytes, str, int]] | None:
    """A find_node reply: at most ``ksize`` [id, ip, port] triples, or None if malformed."""
    if type(raw) is not list or len(raw) > ksize:
        return None
    out: list[tuple[bytes, str, int]] = []
    for item in raw:
        if type(item) is not list or len(item) != 3:
            return None
        node_id, ip, port = item
        if not (_is_id(node_id) and _valid_ip(ip) and _valid_port(port)):
            return None
        out.append((node_id, ip, port))
    return out


def _args_ids(n: int) -> Callable[[list[Any]], tuple[Any, ...] | None]:
    def check(args: list[Any]) -> tuple[Any, ...] | None:
        if len(args) != n or not all(_is_id(a) for a in args):
            return None
        return tuple(args)
    return check


def _args_hello(args: list[Any]) -> tuple[Any, ...] | None:
    if len(args) != 3:
        return None
    nonce, host, port = args
    if type(nonce) is not bytes or len(nonce) != hello_mod.NONCE_LEN:
        return None
    if not (_valid_ip(host) and _valid_port(port)):
        return None
    return nonce, host, port


class _NoStorage(dict):  # type: ignore[type-arg]
    """The library wants an IStorage; nothing is ever stored (``store`` is not served)."""

    def __setitem__(self, key: object, value: object) -> None:
        raise NotImplementedError("the herdwall overlay stores nothing in the DHT")

    def iter_older_than(self, seconds_old: float) -> list[Any]:
        return []

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())


class VersionedRoutingTable(RoutingTable):
    """The library's table, with a version that changes whenever its contents may have, so
    the broadcast core's view of it (asked for on every forward) can be cached."""

    version = 0

    def add_contact(self, node: Node) -> None:
        # Every answered RPC "adds" its sender again (moves it to the bucket's tail); only a
        # new member or a new address is a change worth recomputing anything for.
        old = self.buckets[self.get_bucket_for(node)].nodes.get(node.id)
        if old is None or old.ip != node.ip or old.port != node.port:
            self.version += 1
        super().add_contact(node)

    def remove_contact(self, node: Node) -> None:
        self.version += 1
        super().remove_contact(node)

    def flush(self) -> None:
        self.version += 1
        super().flush()


class HardenedProtocol(KademliaProtocol):
    def __init__(self, source_node: Node, storage: Any, ksize: int, *, key: NodeKey,
                 config: DhtConfig,
                 on_broadcast: Callable[[bytes, Addr], None] | None = None,
                 spawn: Callable[[Any], Any] | None = None) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = VersionedRoutingTable(self, ksize, source_node)
        self.ksize = ksize
        self._wait_timeout = config.rpc_timeout
        self.key = key
        self.config = config
        self.on_broadcast = on_broadcast
        self._spawn_fn = spawn
        self.local_addr: Addr | None = None
        # Set by the owner: addresses banned for lying (overlay.broadcast strikes); their
        # datagrams are dropped here, before any parsing, RPCs included.
        self.banned: Callable[[str], bool] | None = None
        # Called with an address that keeps sending over its rate: the owner bans it.
        self.on_abuse: Callable[[str], None] | None = None
        self._over_rate: OrderedDict[str, tuple[int, float]] = OrderedDict()  # n, since
        self._bad_frames: OrderedDict[str, int] = OrderedDict()
        self.peers = PeerBook(config.max_ids_per_ip, config.max_peers)
        self.misses: OrderedDict[bytes, int] = OrderedDict()
        self.nonces = hello_mod.NonceBook()
        self._dgram_buckets = KeyedBuckets(config.datagram_rate)
        self._hello_buckets = KeyedBuckets(config.hello_rate)
        self._hellos: dict[Addr, asyncio.Future[bytes | None]] = {}
        self._expected: dict[bytes, tuple[Addr, float]] = {}
        self._expired: OrderedDict[bytes, None] = OrderedDict()  # requests that timed out
        # Called with each RPC round trip (seconds): the broadcast core's timeout learns from it.
        self.on_rtt: Callable[[float], None] | None = None
        # Called with an address an ICMP "port unreachable" came back from (nobody listens).
        self.on_unreachable: Callable[[Addr], None] | None = None
        self.stats: Counter[str] = Counter()
        self._handlers: dict[str, tuple[Callable[[list[Any]], tuple[Any, ...] | None],
                                        Callable[..., Any]]] = {
            "ping": (_args_ids(1), self.rpc_ping),
            "find_node": (_args_ids(2), self.rpc_find_node),
            "find_value": (_args_ids(2), self.rpc_find_value),
            "hello": (_args_hello, self.rpc_hello),
        }
        self._flags = hello_mod.FLAG_SUPER_PEER if config.super_peer else 0
        self._error_logged = 0.0

    def serve(self, name: str, check: Callable[[list[Any]], tuple[Any, ...] | None],
              handler: Callable[..., Any]) -> None:
        """Serve one more RPC, ``handler(sender, *checked_args)``, to authenticated peers only.

        ``check`` turns the raw argument list into the handler's arguments or None (malformed:
        a strike like any bad frame). A request from an address whose signed hello has not
        checked out gets no answer; a hello is started so that the asker's retry is served.
        """
        if name in self._handlers:
            raise ValueError(f"RPC {name!r} is already served")

        def gated(sender: Addr, *args: Any) -> Any:
            if self.peers.by_addr(sender) is None:
                self.stats["rx_rpc_unauthenticated"] += 1
                self.start_hello(sender)
                return _NO_REPLY
            return handler(sender, *args)

        self._handlers[name] = (check, gated)

    def call(self, name: str, addr: Addr, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        """Call an RPC another node serves; resolves to ``(ok, reply)``, ``(False, None)`` on
        timeout. The reply is only known to come from ``addr``: check it like any input."""
        return self._call(name, addr, *args)

    def __getattr__(self, name: str) -> Any:
        # rpcudp turns every unknown attribute into a remote call; here a typo is an error and
        # only the RPCs defined below can ever be sent.
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # --- transport ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(Exception):
            sockname = transport.get_extra_info("sockname")
            self.local_addr = (sockname[0], sockname[1])

    def send_datagram(self, data: bytes, addr: Addr) -> None:
        """Every datagram this node sends goes through here (and is counted)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(data) > MAX_DATAGRAM:
            self.stats["tx_oversize"] += 1
            return
        self.stats[_TX_KEYS[data[0]]] += 1
        self.stats["tx"] += 1
        transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        # A socket error other than the ICMP reports ``unreachable`` hears of.
        self.stats["icmp_errors"] += 1

    def unreachable(self, addr: Addr) -> None:
        """Nobody listens at ``addr``: the kernel's ICMP "port unreachable" for a datagram we
        sent there. (Only the address is trusted, as with a timeout: the sender of the ICMP
        is not known, so this is never more than one missed reply's worth of evidence.)"""
        self.stats["rx_unreachable"] += 1
        if self.on_unreachable is not None:
            try:
                self.on_unreachable(addr)
            except Exception:
                self._log_error("unreachable handler")

    def _log_error(self, what: str) -> None:
        self.stats["handler_errors"] += 1
        now = time.monotonic()
        if now - self._error_logged > 10.0:  # at most one traceback every 10 s
            self._error_logged = now
            log.warning("overlay %s failed (further errors counted, not logged)", what,
                        exc_info=True)

    def datagram_received(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        try:
            self._datagram(data, (addr[0], addr[1]))
        except Exception:
            self._log_error("datagram handler")

    def _datagram(self, data: bytes, addr: Addr) -> None:
        n = len(data)
        if n > MAX_DATAGRAM:
            self.stats["drop_oversize"] += 1
            return
        if self.banned is not None and self.banned(addr[0]):
            self.stats["drop_banned"] += 1
            return
        now = time.monotonic()
        # A reply to a request of ours (its 20-byte id nobody else can guess) is not charged:
        # a flood forged in a peer's name must not drown the peer's answers to this node.
        answer = n > _HEAD and data[0] == RPC_RESPONSE and self._answers(data, addr)
        if not answer and not self._dgram_buckets.take(addr[0], now):
            self.stats["drop_rate"] += 1
            self._note_over_rate(addr[0], now)
            return
        self.stats["rx"] += 1
        kind = data[0] if n else -1
        if kind in (RPC_REQUEST, RPC_RESPONSE):
            if not self._rpc_datagram(kind, data, addr):
                if answer:  # the request's one free reply is spent: later ones are charged
                    self._expected.pop(data[1:_HEAD], None)
                self._malformed(addr[0], now)
        elif kind >= 0x10 and self.on_broadcast is not None:
            self.on_broadcast(data, addr)
        else:
            self._malformed(addr[0], now)

    def _answers(self, data: bytes, addr: Addr) -> bool:
        expected = self._expected.get(data[1:_HEAD])
        return expected is not None and expected[0] == addr

    def _malformed(self, ip: str, now: float) -> None:
        # Costly for the sender's bucket, and an honest node never sends one: a few of them
        # and the address is reported for a ban (then the kernel drops what it sends). Not in
        # an authenticated peer's name (anyone can forge that): there it costs one datagram.
        self.stats["drop_malformed"] += 1
        if not self.peers.has_ip(ip):
            self._dgram_buckets.charge(ip, now, self.config.malformed_cost)
        n = self._bad_frames.pop(ip, 0) + 1
        if n >= self.config.malformed_to_ban:
            # Junk is cheap to forge: never a ban of an authenticated peer's address, or
            # anyone could cut a node off from its peers (its rate limit still holds).
            if self.peers.has_ip(ip):
                self.stats["abuse_spared"] += 1
            else:
                self._report(ip)
            return
        self._bad_frames[ip] = n
        while len(self._bad_frames) > self.config.max_peers:
            self._bad_frames.popitem(last=False)

    def _report(self, ip: str) -> None:
        self.stats["abusers"] += 1
        if self.on_abuse is not None:
            self.on_abuse(ip)  # the owner bans it, in the kernel too

    def _note_over_rate(self, ip: str, now: float) -> None:
        # No honest peer comes near the datagram rate; one that keeps exceeding it is flooding,
        # and is reported whoever it is. "Keeps": over the rate for ``abuse_sustained_s`` at
        # least, so a forged burst in a peer's name (600 datagrams take 2 ms) bans nobody.
        n, since = self._over_rate.pop(ip, (0, now))
        if now - since > ABUSE_WINDOW_S:
            n, since = 0, now  # an old episode: counted afresh
        n += 1
        if n >= self.config.abuse_drops and now - since >= self.config.abuse_sustained_s:
            self._report(ip)
            return
        self._over_rate[ip] = (n, since)
        while len(self._over_rate) > self.config.max_peers:
            self._over_rate.popitem(last=False)

    def _rpc_datagram(self, kind: int, data: bytes, addr: Addr) -> bool:
        if len(data) <= _HEAD:
            return False
        msg_id = data[1:_HEAD]
        if kind == RPC_RESPONSE:
            # Checked before parsing, so a reply to nothing we asked costs no unpacking. A late
            # reply to a request that timed out is an honest node's; one to an id this node
            # never sent (20 random bytes nobody can guess) is junk, and counts toward a ban.
            expected = self._expected.get(msg_id)
            if expected is None or expected[0] != addr:
                late = msg_id in self._expired
                self.stats["rx_late_response" if late else "rx_unexpected_response"] += 1
                return late or expected is not None
        try:
            obj = mpack.unpackb(data[_HEAD:])
        except mpack.MpackError:
            return False
        if kind == RPC_REQUEST:
            return self._request(msg_id, obj, addr)
        return self._response(msg_id, obj, addr)

    def _request(self, msg_id: bytes, obj: object, addr: Addr) -> bool:
        if type(obj) is not list or len(obj) != 2:
            return False
        name, args = obj
        if type(name) is not str or type(args) is not list:
            return False
        entry = self._handlers.get(name)
        if entry is None:
            self.stats["rx_unknown_rpc"] += 1
            return True  # well-formed, just not served (store, stun, ...)
        check, handler = entry
        checked = check(args)
        if checked is None:
            return False
        self.stats[f"rx_rpc_{name}"] += 1
        response = handler(addr, *checked)
        if response is not _NO_REPLY:
            self.send_datagram(b"\x01" + msg_id + mpack.packb(response), addr)
        return True

    def _response(self, msg_id: bytes, obj: object, addr: Addr) -> bool:
        expected = self._expected[msg_id]  # checked in _rpc_datagram
        entry = self._outstanding.pop(msg_id, None)
        del self._expected[msg_id]
        if entry is None:
            return True
        if self.on_rtt is not None:
            self.on_rtt(time.monotonic() - expected[1])
        future, timeout = entry
        timeout.cancel()
        if not future.done():
            future.set_result((True, obj))
        return True

    def _call(self, name: str, addr: Addr, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        msg_id = os.urandom(20)
        data = b"\x00" + msg_id + mpack.packb([name, list(args)])
        if self.transport is None or self.transport.is_closing() or len(data) > MAX_DATAGRAM:
            future.set_result((False, None))
            return future
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timeout)
        self._expected[msg_id] = (addr, time.monotonic())
        self.send_datagram(data, addr)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        if self._expected.pop(msg_id, None) is not None:
            self._expired[msg_id] = None
            while len(self._expired) > self.config.max_peers:
                self._expired.popitem(last=False)
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    def close_outstanding(self) -> None:
        for future, timeout in self._outstanding.values():
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._expected.clear()

    # The library reaches these through RPCProtocol.__getattr__; defining them means only the
    # RPCs listed here can ever be sent.
    def ping(self, addr: Addr, node_id: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self._call("ping", addr, node_id)

    def find_node(self, addr: Addr, node_id: bytes, key: bytes
                  ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call("find_node", addr, node_id, key)

    def find_value(self, addr: Addr, node_id: bytes, key: bytes
                   ) -> asyncio.Future[tuple[bool, Any]]:
        return self._call("find_node", addr, node_id, key)  # nothing is stored anywhere

    def hello(self, addr: Addr, nonce: bytes) -> asyncio.Future[tuple[bool, Any]]:
        return self._call("hello", addr, nonce, addr[0], addr[1])

    def store(self, *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        raise NotImplementedError("store is disabled")

    # --- handlers (run inline; arguments already checked) --------------------------------------

    def rpc_ping(self, sender: Addr, nodeid: bytes) -> bytes:  # type: ignore[override]
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self.source_node.id

    def rpc_find_node(self, sender: Addr, nodeid: bytes, key: bytes  # type: ignore[override]
                      ) -> list[tuple[bytes, str, int]]:
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        neighbours = self.router.find_neighbors(Node(key), exclude=source)
        return [(n.id, n.ip, n.port) for n in neighbours]

    def rpc_find_value(self, sender: Addr, nodeid: bytes, key: bytes  # type: ignore[override]
                       ) -> list[tuple[bytes, str, int]]:
        return self.rpc_find_node(sender, nodeid, key)

    def rpc_store(self, *args: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("store is disabled")

    def rpc_stun(self, *args: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("stun is not served")

    def rpc_hello(self, sender: Addr, nonce: bytes, host: str, port: int) -> Any:
        # Sign only the address this node is really at: the asker checks it against the one
        # it sent to, so a hello cannot be used to vouch for another address.
        local = self.local_addr
        if local is None or port != local[1]:
            return _NO_REPLY
        if local[0] not in ("0.0.0.0", "::") and ipaddress.ip_address(host) != \
                ipaddress.ip_address(local[0]):
            return _NO_REPLY
        return hello_mod.make_hello(self.key, host, port, nonce, self._flags).wire()

    # --- calls with checked replies (the library's crawler uses these) -------------------------

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node
                             ) -> tuple[bool, Any]:
        return await self._checked_find(node_to_ask, node_to_find)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node
                              ) -> tuple[bool, Any]:
        return await self._checked_find(node_to_ask, node_to_find)

    async def _checked_find(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        try:
            ok, raw = await self.find_node((node_to_ask.ip, node_to_ask.port),
                                           self.source_node.id, node_to_find.id)
            result: tuple[bool, Any] = (False, None)
            if ok:
                nodes = valid_node_list(raw, self.ksize)
                if nodes is None:
                    self.stats["bad_replies"] += 1
                else:
                    result = (True, nodes)
                    self._learn(nodes)
            return self.handle_call_response(result, node_to_ask)
        except Exception:
            self._log_error("find_node call")
            return (False, None)

    def _learn(self, nodes: list[tuple[bytes, str, int]]) -> None:
        """Say hello to contacts a reply named whose bucket has room. The library admits only
        nodes that answered it directly, so a table fills only as fast as lookups contact
        nodes; a hello (two small datagrams) is much cheaper than a find_node round trip, and
        admission still needs the hello to check out."""
        router = self.router
        for node_id, ip, port in nodes:
            if node_id == self.source_node.id or self.peers.get(node_id) is not None:
                continue
            if len(self._hellos) >= self.config.max_hellos_inflight // 2:
                return
            node = Node(node_id, ip, port)
            bucket = router.buckets[router.get_bucket_for(node)]
            if len(bucket) < self.ksize or bucket.has_in_range(self.source_node):
                self.start_hello((ip, port), node_id)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        try:
            ok, raw = await self.ping((node_to_ask.ip, node_to_ask.port), self.source_node.id)
            good = ok and _is_id(raw) and raw == node_to_ask.id
            if ok and not good:
                self.stats["bad_replies"] += 1
            return self.handle_call_response((True, raw) if good else (False, None),
                                             node_to_ask)
        except Exception:
            self._log_error("ping call")
            return (False, None)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        return (False, None)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if not result[0]:
            self.note_miss(node.id)
            return result
        self.misses.pop(node.id, None)
        self.welcome_if_new(node)
        return result

    def note_miss(self, node_id: bytes) -> None:
        """A contact did not answer; the third miss in a row evicts it."""
        n = self.misses.pop(node_id, 0) + 1
        if n >= self.config.misses_to_evict:
            self.stats["evicted"] += 1
            self.router.remove_contact(Node(node_id))
            return
        self.misses[node_id] = n
        while len(self.misses) > self.config.max_peers:
            self.misses.popitem(last=False)

    # --- admission ----------------------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Admit ``node`` if its hello has checked out at this address; else ask for one."""
        if not _is_id(node.id) or node.id == self.source_node.id:
            return
        addr = (node.ip, node.port)
        peer = self.peers.get(node.id)
        if peer is not None and peer.addr == addr:
            self.router.add_contact(node)
            return
        self.start_hello(addr, node.id)

    def start_hello(self, addr: Addr, expected_id: bytes | None = None
                    ) -> asyncio.Future[bytes | None] | None:
        """Authenticate whoever is at ``addr`` (at most one hello per address at a time)."""
        running = self._hellos.get(addr)
        if running is not None:
            return running
        if len(self._hellos) >= self.config.max_hellos_inflight:
            self.stats["hello_busy"] += 1
            return None
        if not self._hello_buckets.take(addr[0], time.monotonic()):
            self.stats["hello_rate"] += 1
            return None
        task = asyncio.ensure_future(self._hello(addr, expected_id))
        self._hellos[addr] = task
        task.add_done_callback(lambda t, addr=addr: self._hello_done(addr, t))
        return task

    def _hello_done(self, addr: Addr, task: asyncio.Future[bytes | None]) -> None:
        self._hellos.pop(addr, None)
        if not task.cancelled() and task.exception() is not None:
            self.stats["handler_errors"] += 1

    async def _hello(self, addr: Addr, expected_id: bytes | None) -> bytes | None:
        try:
            nonce = self.nonces.issue(time.monotonic())
            ok, raw = await self.hello(addr, nonce)
            if not ok:
                self.stats["hello_timeout"] += 1
                known = None if expected_id is None else self.peers.get(expected_id)
                # A miss for the contact only where it is: anyone can claim its id from
                # elsewhere (a ping in its name) and leave our hello there unanswered.
                if known is not None and known.addr == addr:
                    self.note_miss(expected_id)  # type: ignore[arg-type]
                return None
            if not self.nonces.redeem(nonce, time.monotonic()):
                self.stats["hello_stale"] += 1
                return None
            reply = hello_mod.parse_hello(raw)
            node_id = hello_mod.check_hello(reply, addr[0], addr[1], nonce, expected_id)
        except hello_mod.HelloError as exc:
            self.stats["hello_refused"] += 1
            log.debug("hello from %s refused: %s", addr, exc)
            return None
        except Exception:
            self._log_error("hello")
            return None
        if node_id == self.source_node.id:
            return None
        if not self.peers.room_for(node_id, addr):
            self.stats["hello_ip_cap"] += 1
            return None
        for gone in self.peers.add(Peer(node_id, addr, reply.flags)):
            self.router.remove_contact(Node(gone.node_id))
        self.stats["hello_ok"] += 1
        self.router.add_contact(Node(node_id, addr[0], addr[1]))
        return node_id

    def contacts(self) -> list[Node]:
        return [n for bucket in self.router.buckets for n in bucket.nodes.values()]


class UdpEndpoint:
    """The UDP socket on the event loop, in place of asyncio's datagram transport, which
    reads one datagram per loop iteration: under a flood (or a thousand nodes in one process)
    each datagram then costs a whole iteration. This reads up to ``BATCH`` per wake-up, so
    dropping a datagram (banned, over its rate, oversized) costs little more than the
    ``recvfrom``. It offers what the protocol and the library use of a transport: ``sendto``,
    ``close``, ``is_closing``, ``get_extra_info``."""

    BATCH = 64

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.DatagramProtocol) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.send_dropped = 0
        self._closing = False
        self._drain_soon: asyncio.Handle | None = None
        self._fd = sock.fileno()
        protocol.connection_made(self)  # type: ignore[arg-type]
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        deliver = self.protocol.datagram_received
        for k in range(self.BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                if k == 0:  # woken for nothing to read: an error queued (EPOLLERR) perhaps
                    self._drain_errors()
                return
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:  # an ICMP error queued: see which address
                    self._drain_errors()
                    continue
                self.protocol.error_received(exc)
                return
            deliver(data, addr)
            if self._closing:
                return

    def _drain_errors(self) -> None:
        """Read the socket's error queue (``IP_RECVERR``): every ICMP error for a datagram we
        sent, with the address it was sent to. Each one also leaves a pending error that the
        next ``recvfrom`` or ``sendto`` reports (and that is how we know to look)."""
        self._drain_soon = None
        unreachable = self.protocol.unreachable  # type: ignore[attr-defined]
        for _ in range(self.BATCH):
            try:
                _, ancdata, _, addr = self.sock.recvmsg(1, 64, socket.MSG_ERRQUEUE)
            except OSError:  # empty (or closed)
                return
            for _, _, err in ancdata:
                # struct sock_extended_err: errno (4), origin, type, code, pad, info, data
                if len(err) >= 8 and _PORT_UNREACHABLE.get(err[4]) == (err[5], err[6]):
                    unreachable((addr[0], addr[1]))
            if self._closing:
                return

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self._closing:
            return
        for attempt in range(2):
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self.send_dropped += 1  # a full send buffer: UDP may lose it anyway
            except OSError as exc:
                if attempt == 0 and exc.errno in _ICMP_ERRNOS:
                    # Most likely an earlier datagram's ICMP error, reported (and cleared)
                    # here instead of sending this one: read the queue after this callback,
                    # and send again (a second error is this datagram's own).
                    if self._drain_soon is None:
                        self._drain_soon = self.loop.call_soon(self._drain_errors)
                    continue
                self.protocol.error_received(exc)
            return

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._drain_soon is not None:
            self._drain_soon.cancel()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        self.sock.close()
        self.protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.sock.getsockname() if not self._closing else default
        if name == "socket":
            return self.sock
        return default


def set_mark(sock: socket.socket, mark: int | None) -> None:
    """``SO_MARK`` (needs CAP_NET_ADMIN): a node's own traffic must not be queued or throttled
    by its own firewall."""
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def _make_udp_socket(host: str, port: int, rcvbuf: int,
                     mark: int | None = None) -> tuple[socket.socket, int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        set_mark(sock, mark)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, rcvbuf)
        except (OSError, AttributeError):  # needs CAP_NET_ADMIN; fall back to the capped one
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        with contextlib.suppress(OSError):  # ICMP errors, with the address (see UdpEndpoint)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    # Linux reports twice the size asked for (its bookkeeping overhead); halve it back.
    in_effect = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    return sock, in_effect


class HardenedServer(Server):
    protocol_class = HardenedProtocol

    def __init__(self, key: NodeKey, config: DhtConfig | None = None,
                 on_broadcast: Callable[[bytes, Addr], None] | None = None) -> None:
        self.config = config or DhtConfig()
        super().__init__(ksize=self.config.ksize, alpha=self.config.alpha, node_id=key.node_id,
                         storage=_NoStorage())
        self.key = key
        self.on_broadcast = on_broadcast
        self.protocol: HardenedProtocol | None = None  # type: ignore[assignment]
        self.rcvbuf_in_effect = 0
        self.sock: socket.socket | None = None
        self.kernel_filter = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()

    def _create_protocol(self) -> HardenedProtocol:
        return HardenedProtocol(self.node, self.storage, self.ksize, key=self.key,
                                config=self.config, on_broadcast=self.on_broadcast)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task whose failure is counted and logged, never left unretrieved."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self.protocol is not None:
                try:
                    raise t.exception()  # type: ignore[misc]
                except Exception:
                    self.protocol._log_error("task")
        task.add_done_callback(done)
        return task

    async def listen(self, port: int, interface: str = "0.0.0.0") -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        sock, self.rcvbuf_in_effect = _make_udp_socket(interface, port, self.config.rcvbuf,
                                                       self.config.socket_mark)
        self.sock = sock
        self.kernel_filter = kfilter.attach(sock, MAX_DATAGRAM)
        log.info("overlay %s: UDP %s:%d, receive buffer %d bytes in effect (asked %d), "
                 "kernel filter %s", self.node.id.hex()[:12], interface, sock.getsockname()[1],
                 self.rcvbuf_in_effect, self.config.rcvbuf,
                 "on" if self.kernel_filter else "unavailable")
        protocol = self._create_protocol()
        self.transport = UdpEndpoint(loop, sock, protocol)  # type: ignore[assignment]
        self.protocol = protocol
        self.refresh_table()

    def set_banned(self, ips: list[str]) -> None:
        """Have the kernel drop datagrams from ``ips`` (IPv4) from now on."""
        if self.sock is not None and self.kernel_filter and self.sock.fileno() >= 0:
            kfilter.attach(self.sock, MAX_DATAGRAM, ips)

    def refresh_table(self, interval: float | None = None) -> None:  # type: ignore[override]
        self.refresh_loop = self.spawn(self._refresh_forever())  # type: ignore[assignment]

    async def _refresh_forever(self) -> None:
        # Early passes while they still teach the table something, the first full pass soon
        # after joining: nodes that joined after us, and contacts lost to timeouts in the join
        # rush, get into the table; then every ``refresh_s``.
        delay = self.config.early_refresh_s
        while 0 < delay < self.config.first_refresh_s:
            await asyncio.sleep(delay * self._rng.uniform(0.75, 1.25))
            await self.refresh_groups()
            delay *= 2
        period = self.config.first_refresh_s
        while True:
            await asyncio.sleep(period * self._rng.uniform(0.75, 1.25))
            await self.refresh_groups()
            period = self.config.refresh_s

    async def refresh_groups(self, extra: int = 3) -> int:
        """Look up a random id in every prefix group down to ``extra`` past the deepest one
        that has contacts, so the table learns each subtree; returns lookups made."""
        protocol = self.protocol
        if protocol is None:
            return 0
        me = int.from_bytes(self.node.id, "big")
        deepest = -1
        for n in protocol.contacts():
            deepest = max(deepest, 160 - (me ^ n.long_id).bit_length())
        depth = min(160, deepest + 1 + extra)
        counts = Counter(160 - (me ^ n.long_id).bit_length() for n in protocol.contacts())
        lookups = []
        for p in range(depth):
            if counts[p] >= self.ksize:
                continue  # a full group: a lookup there would teach the table nothing
            # Same first p bits as mine, bit p flipped, the rest random: a point in group p.
            flip = 1 << (159 - p)
            low = self._rng.getrandbits(159 - p) if p < 159 else 0
            target = ((me >> (160 - p) << (160 - p)) if p else 0) | ((me & flip) ^ flip) | low
            node = Node(target.to_bytes(20, "big"))
            nearest = protocol.router.find_neighbors(node, self.alpha)
            if nearest:
                # A shallow crawl: the replies name the group's members, and ``_learn`` says
                # hello to them; contacting all k nearest of a random point is not needed.
                lookups.append(NodeSpiderCrawl(protocol, node, nearest, self.config.refresh_k,
                                               self.alpha).find())
        if lookups:
            await asyncio.gather(*lookups, return_exceptions=True)
        return len(lookups)

    async def bootstrap(self, addrs: list[Addr]) -> list[Node]:  # type: ignore[override]
        """Authenticate the given peers, look ourselves up through them, then fill the table
        group by group. Never raises for anything the peers do."""
        protocol = self.protocol
        if protocol is None:
            raise RuntimeError("listen() first")
        hellos = [protocol.start_hello((a[0], a[1])) for a in addrs]
        await asyncio.gather(*(h for h in hellos if h is not None), return_exceptions=True)
        nodes = protocol.router.find_neighbors(self.node, self.ksize)
        if not nodes:
            return []
        found = await NodeSpiderCrawl(protocol, self.node, nodes, self.ksize,
                                      self.alpha).find()
        await self.refresh_groups()
        return list(found)

    async def bootstrap_node(self, addr: Addr) -> Node | None:  # type: ignore[override]
        protocol = self.protocol
        if protocol is None:
            return None
        task = protocol.start_hello(addr)
        node_id = await task if task is not None else None
        return None if node_id is None else Node(node_id, addr[0], addr[1])

    def bootstrappable_neighbors(self) -> list[Addr]:  # type: ignore[override]
        protocol = self.protocol
        if protocol is None:
            return []
        return [(n.ip, n.port) for n in protocol.router.find_neighbors(self.node)]

    async def get(self, key: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("the herdwall overlay stores nothing in the DHT")

    async def set(self, key: Any, value: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("the herdwall overlay stores nothing in the DHT")

    async def set_digest(self, dkey: Any, value: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("the herdwall overlay stores nothing in the DHT")

    def save_state(self, fname: Any) -> None:  # type: ignore[override]
        raise NotImplementedError("pickle state is unsafe; see overlay.neighbours")

    @classmethod
    async def load_state(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("pickle state is unsafe; see overlay.neighbours")

    def save_state_regularly(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise NotImplementedError("pickle state is unsafe; see overlay.neighbours")

    async def aclose(self) -> None:
        """Stop everything this server runs and wait for it."""
        if self.transport is not None:
            self.transport.close()
        if self.protocol is not None:
            self.protocol.close_outstanding()
            for hello_task in list(self.protocol._hellos.values()):
                hello_task.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for task in list(self._tasks):
            task.cancel()
