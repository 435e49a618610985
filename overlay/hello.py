"""Signed hello: how a peer proves its node id and address before it enters a routing table.

Node ids are not chosen: a node id is the first 20 bytes of SHA-256 of the node's Ed25519
public key (``sca.keys``). To admit a contact, a node sends a fresh random nonce to the address
it has for it; the contact answers with its public key, a flags byte and an Ed25519 signature
over::

    b"herdwall-hello-v1\\0" || node id (20) || u8 len(host) || host || u16be port
        || nonce (16) || flags (1)

The asker checks that the key hashes to the id it was told (if it was told one), that the
signature is good, that the address signed is the one it asked at, and that the nonce is its
own and unused. So an id cannot be claimed without its key, an answer cannot be replayed (a
nonce is good once, for ``NONCE_TTL`` seconds), and a peer's id is tied to the address that
answered. Making many ids stays cheap (keys are free), so the routing table also caps ids per
IP address (``overlay.dht``).

Flags: bit 0 says the node is a super-peer (it verifies alerts for many services).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

from sca.keys import PUBLIC_KEY_LEN, SIGNATURE_LEN, NodeKey, node_id_of, verify_signature

CONTEXT = b"herdwall-hello-v1\0"
NONCE_LEN = 16
NONCE_TTL = 30.0
MAX_HOST_LEN = 45  # the longest textual IPv6 address
FLAG_SUPER_PEER = 0x01


class HelloError(ValueError):
    """A hello that does not prove what it claims."""


def check_host_port(host: object, port: object) -> tuple[str, int]:
    """An IP address literal and a port, or ``HelloError``; hostnames are refused here."""
    if type(host) is not str or not 0 < len(host) <= MAX_HOST_LEN:
        raise HelloError("host must be an IP address string")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise HelloError(f"not an IP address: {host[:MAX_HOST_LEN]!r}") from None
    if type(port) is not int or not 0 < port <= 0xFFFF:
        raise HelloError("port must be an integer 1..65535")
    return host, port


def hello_message(node_id: bytes, host: str, port: int, nonce: bytes, flags: int) -> bytes:
    encoded = host.encode("ascii")
    return b"".join((CONTEXT, node_id, bytes((len(encoded),)), encoded,
                     struct.pack(">H", port), nonce, bytes((flags,))))


@dataclass(frozen=True, slots=True)
class Hello:
    public_key: bytes
    signature: bytes
    flags: int

    def wire(self) -> list[object]:
        return [self.public_key, self.signature, self.flags]


def make_hello(key: NodeKey, host: str, port: int, nonce: bytes, flags: int) -> Hello:
    if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
        raise HelloError(f"a nonce is {NONCE_LEN} bytes")
    check_host_port(host, port)
    signature = key.sign(hello_message(key.node_id, host, port, nonce, flags))
    return Hello(key.public_bytes, signature, flags)


def parse_hello(raw: object) -> Hello:
    """A hello reply as it came off the wire (a msgpack array), checked for shape only."""
    if type(raw) not in (list, tuple) or len(raw) != 3:  # type: ignore[arg-type]
        raise HelloError("a hello is [key, signature, flags]")
    public_key, signature, flags = raw  # type: ignore[misc]
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_LEN:
        raise HelloError("bad public key")
    if type(signature) is not bytes or len(signature) != SIGNATURE_LEN:
        raise HelloError("bad signature")
    if type(flags) is not int or not 0 <= flags <= 0xFF:
        raise HelloError("bad flags")
    return Hello(public_key, signature, flags)  # unknown bits are signed and ignored


def check_hello(hello: Hello, host: str, port: int, nonce: bytes,
                expected_id: bytes | None = None) -> bytes:
    """The proven node id, or ``HelloError``."""
    node_id = node_id_of(hello.public_key)
    if expected_id is not None and node_id != expected_id:
        raise HelloError("key does not hash to the claimed node id")
    message = hello_message(node_id, host, port, nonce, hello.flags)
    if not verify_signature(hello.public_key, hello.signature, message):
        raise HelloError("bad hello signature")
    return node_id


class NonceBook:
    """Nonces this node sent, each good for one answer within ``ttl`` seconds; bounded."""

    def __init__(self, ttl: float = NONCE_TTL, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._issued: OrderedDict[bytes, float] = OrderedDict()

    def issue(self, now: float) -> bytes:
        # Unanswered nonces expire oldest first (they were issued in time order).
        while self._issued and next(iter(self._issued.values())) <= now:
            self._issued.popitem(last=False)
        nonce = os.urandom(NONCE_LEN)
        self._issued[nonce] = now + self.ttl
        while len(self._issued) > self.max_entries:
            self._issued.popitem(last=False)
        return nonce

    def redeem(self, nonce: bytes, now: float) -> bool:
        """True once for a nonce this book issued and that has not expired."""
        expires = self._issued.pop(nonce, None)
        return expires is not None and expires > now
