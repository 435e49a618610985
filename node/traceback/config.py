"""Router-role configuration: who this router is and what is on the other end of each link.

A router knows its own 14-bit id and, for every interface it forwards on, either the
traceback router on the other end (its id, its overlay address, where it answers queries, and
its public key, the overlay node key) or that
the link faces hosts (an *edge* link, with the prefix behind it for reports). That is all the
map a traceback needs: a query's answer carries the answering router's links, so the victim
learns the topology hop by hop, each hop vouched for by the key of the one before.

As a dict (JSON or TOML, hostile input: checked here)::

    {"router_id": 102,
     "links": [{"name": "to-r1", "kind": "router", "router_id": 101,
                "addr": "10.77.101.1:7400", "key": "<64 hex>"},
               {"name": "eth1", "kind": "edge", "prefix": "10.77.11.0/24"}],
     "bloom": {"fp_rate": 0.01, "slice_s": 1.0, "max_bytes": 67108864},
     "queriers": ["<64 hex>", ...]}            # optional: only these keys may ask
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from node.traceback.bloom import BloomConfig
from node.traceback.marking import ID_MASK

ROUTER: Literal["router"] = "router"
EDGE: Literal["edge"] = "edge"
MAX_LINKS = 8  # an answer names them all in one overlay datagram (wire.MAX_ANSWER_BYTES)
PUBLIC_KEY_LEN = 32


class ConfigError(ValueError):
    """A router configuration is malformed."""


def parse_addr(text: object) -> tuple[str, int]:
    """``"a.b.c.d:port"`` -> (host, port); IPv4 literals only (no name lookups on this path)."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise ConfigError(f"address {text!r}: expected a.b.c.d:port")
    host, _, port = text.partition(":")
    try:
        ipaddress.IPv4Address(host)
        p = int(port)
    except ValueError:
        raise ConfigError(f"address {text!r}: expected a.b.c.d:port") from None
    if not 0 < p < 65536:
        raise ConfigError(f"address {text!r}: port out of range")
    return host, p


def format_addr(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def parse_key(text: object) -> bytes:
    if isinstance(text, bytes) and len(text) == PUBLIC_KEY_LEN:
        return text
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != PUBLIC_KEY_LEN:
        raise ConfigError("a public key is 64 hex digits (raw Ed25519)")
    return raw


def check_id(v: object) -> int:
    if type(v) is not int or not 0 <= v <= ID_MASK:
        raise ConfigError(f"router id {v!r} is not a 14-bit number")
    return v


def check_link_name(v: object) -> str:
    # Interface names as Linux allows them: at most 15 bytes, no "/", ":" or spaces (they end
    # up in reports, and "/" marks a router's internal table names).
    if (not isinstance(v, str) or not 0 < len(v) <= 15 or not v.isprintable()
            or any(c in v for c in " /:")):
        raise ConfigError(f"link name {v!r}: 1-15 printable characters, no space, / or :")
    return v


@dataclass(frozen=True)
class RouterRef:
    """How to reach and recognise a traceback router."""

    addr: tuple[str, int]
    public_key: bytes
    router_id: int | None = None  # learned from its answer when not known in advance

    def label(self) -> str:
        rid = "?" if self.router_id is None else str(self.router_id)
        return f"router {rid} at {format_addr(self.addr)}"


@dataclass(frozen=True)
class Link:
    name: str
    kind: Literal["router", "edge"]
    peer: RouterRef | None = None  # router links
    prefix: str | None = None  # edge links: what lies behind (for reports and sanity checks)

    @classmethod
    def from_dict(cls, d: object) -> Link:
        if not isinstance(d, dict):
            raise ConfigError("a link is a table")
        name = check_link_name(d.get("name"))
        kind = d.get("kind")
        if kind == ROUTER:
            peer = RouterRef(parse_addr(d.get("addr")), parse_key(d.get("key")),
                             check_id(d.get("router_id")))
            return cls(name, ROUTER, peer=peer)
        if kind == EDGE:
            prefix = d.get("prefix")
            if prefix is not None:
                try:
                    prefix = str(ipaddress.IPv4Network(prefix, strict=False))
                except (ValueError, TypeError):
                    raise ConfigError(f"link {name}: bad prefix {prefix!r}") from None
            return cls(name, EDGE, prefix=prefix)
        raise ConfigError(f"link {name}: kind must be 'router' or 'edge'")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == ROUTER:
            assert self.peer is not None
            return {"name": self.name, "kind": ROUTER, "router_id": self.peer.router_id,
                    "addr": format_addr(self.peer.addr), "key": self.peer.public_key.hex()}
        out: dict[str, Any] = {"name": self.name, "kind": EDGE}
        if self.prefix is not None:
            out["prefix"] = self.prefix
        return out


@dataclass(frozen=True)
class RouterConfig:
    router_id: int
    links: tuple[Link, ...]
    bloom: BloomConfig = field(default_factory=BloomConfig)
    queriers: frozenset[bytes] | None = None  # None: any node that signs its query
    max_skew_s: float = 30.0  # a query's timestamp may be this far from our clock

    def __post_init__(self) -> None:
        check_id(self.router_id)
        if len(self.links) > MAX_LINKS:
            raise ConfigError(f"at most {MAX_LINKS} links")
        names = [lk.name for lk in self.links]
        if len(set(names)) != len(names):
            raise ConfigError("link names must be unique")

    def link(self, name: str) -> Link | None:
        for lk in self.links:
            if lk.name == name:
                return lk
        return None

    @classmethod
    def from_dict(cls, d: object) -> RouterConfig:
        if not isinstance(d, dict):
            raise ConfigError("router config must be a table")
        unknown = set(d) - {"router_id", "links", "bloom", "queriers", "max_skew_s"}
        if unknown:
            raise ConfigError(f"unknown keys {sorted(map(str, unknown))}")
        links = d.get("links", [])
        if not isinstance(links, list):
            raise ConfigError("links must be a list")
        bloom_d = d.get("bloom", {})
        if not isinstance(bloom_d, dict):
            raise ConfigError("bloom must be a table")
        known = {f.name for f in fields(BloomConfig)}
        if set(bloom_d) - known:
            raise ConfigError(f"unknown bloom keys {sorted(set(bloom_d) - known)}")
        try:
            bloom = BloomConfig(**bloom_d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bloom: {e}") from None
        queriers = d.get("queriers")
        if queriers is not None:
            if not isinstance(queriers, list):
                raise ConfigError("queriers must be a list of public keys")
            queriers = frozenset(parse_key(q) for q in queriers)
        skew = d.get("max_skew_s", 30.0)
        if not isinstance(skew, int | float) or not 0 < skew <= 3600:
            raise ConfigError("max_skew_s must be in (0, 3600]")
        return cls(check_id(d.get("router_id")), tuple(Link.from_dict(x) for x in links),
                   bloom, queriers, float(skew))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "router_id": self.router_id,
            "links": [lk.to_dict() for lk in self.links],
            "bloom": {f.name: getattr(self.bloom, f.name) for f in fields(BloomConfig)},
            "max_skew_s": self.max_skew_s}
        if self.queriers is not None:
            out["queriers"] = sorted(q.hex() for q in self.queriers)
        return out
