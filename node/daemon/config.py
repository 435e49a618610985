"""The node's configuration: TOML, validated, with embedded defaults.

``herdwall node run`` works with no file at all: every key has a default (``DEFAULTS_TOML``
below is the whole schema, with comments). A file overrides what it names and nothing else.
Every key is checked for type and range; an unknown section or key is refused (a typo must not
silently fall back to a default), and every error names the key, e.g.
``/etc/herdwall.toml: detector.queue_size: must be an integer from 1 to 100000, got 0``.

Relative paths in a file are taken from the file's folder, so a config and its service
manifests can move together.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from node.daemon import realtime
from sca.keys import default_state_dir

CONFIG_ENV = "HERDWALL_CONFIG"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KiB; a huge file is a mistake or an attack

# The schema, as a user would write it. Kept in step with ``_SCHEMA`` by a test.
DEFAULTS_TOML = """\
# herdwall node configuration. Every key is optional; these are the defaults.

# Where the store (herdwall.db), the node key (node.key) and the control socket live.
# Default: $HERDWALL_STATE_DIR, else /var/lib/herdwall for root, else ~/.local/state/herdwall.
state_dir = ""

[services]
# Service manifests (service.toml) this host protects. None by default: the four sample
# services are deliberately vulnerable and are never protected unless listed here.
manifests = []

[detector]
# Replay what arrives for the protected services with taint tracking (a designated detector).
enabled = false
workers = 2            # sandbox processes for taint replay (the detection lane): with two, an
                       # exploit is not held back behind the replay of a benign message
queue_size = 256       # submissions waiting for a worker; past this, random sampling
job_timeout_s = 10.0   # a replay that takes longer is abandoned (the sandbox has budgets too)

[verifier]
workers = 1            # sandbox processes for verifying received alerts (the fast lane)
realtime_priority = 4  # the daemon's event loop and these workers run SCHED_FIFO at this
                       # priority (1-49): woken by an alert, they run at once instead of after
                       # other tasks' time slices. 0: normal scheduling. Taint replay and filter
                       # generation always run at normal priority

[filters]
general = true         # also derive the general (vulnerability) filter, not only the specific
expire_after_s = 0     # 0: filters stay until an operator removes them
workers = 1            # sandbox processes deriving general filters, at low CPU priority
general_delay_ms = 100 # start deriving the general filter this long after the alert verified:
                       # the alert's burst (neighbours fetching it, their verdicts) goes first
tcp_action = "reject"  # what a TCP filter does to a flow it matches: "drop", "reject" (TCP
                       # reset) or "takeover" (the node takes the flow over, see [takeover])

[takeover]
# With [filters] tcp_action = "takeover": what a taken-over connection does.
policy = "scrub"       # "scrub": drop the malicious message, pass the benign bytes around it;
                       # "close": FIN to the client, the server sees an ordinary end of stream;
                       # "respond": send the client `reply`, then close
reply = ""             # the client's reply under "respond" (sent as UTF-8)

[overlay]
enabled = true
bind = "0.0.0.0:7400"
bootstrap = []         # "host:port" of peers to join through
serve_first_ms = 3     # after an alert verified here, its filter and store rows wait up to this
                       # long for the nodes it was announced to to fetch it (their fetches are
                       # served first: the alert spreads faster); 0: no waiting

[kernel]
enabled = true         # table inet herdwall and the NFQUEUE rules; false: touch no kernel state
fail_open = true       # with no node reading the queues, packets pass (never blackholed)
queue_max_len = 4096

[throttle]
enabled = true
working_set_size = 5
release_rate = 1.0     # new destinations per second per host
threshold = 100        # queued attempts past which a host is flagged infected
allowlist = []         # destinations never delayed, as CIDRs
quarantine_infected = false   # block all outgoing traffic of a flagged host but the node's own

[traceback]
# Router role, only inside a testbed router namespace (hw-*): log and mark the packets this
# host forwards (NFQUEUE) and answer traceback queries from overlay peers. Needs the overlay
# and the kernel parts.
router = false
router_id = 0          # the 14-bit id (0 to 16383) this router marks into packets
links = []             # each interface it forwards on: a neighbour router, as
                       #   {name = "to-r2", kind = "router", router_id = 102,
                       #    addr = "10.77.100.2:7400", key = "<its node key, hex>"}
                       # (its overlay address), or hosts: {name = "h-lan", kind = "edge",
                       #   prefix = "10.77.1.0/24"}
fp_rate = 0.01         # Bloom-filter false-positive rate per digest-table lookup
slice_s = 2.0          # digest tables are cut into slices of at most this many seconds
max_bytes = 67108864   # memory for all digest tables together
queriers = []          # node keys (hex) that may ask; empty: any overlay peer
# Victim side (herdwall alert trace): this host's last-hop traceback router.
gateway = ""           # its overlay address, "a.b.c.d:port"
gateway_key = ""       # its node key (hex)

[control]
socket = ""            # default: <state_dir>/control.sock (mode 0600)

[metrics]
listen = ""            # "127.0.0.1:9477" serves Prometheus metrics there; empty: off

[events]
log = ""               # JSON lines, one per event; default <state_dir>/events.jsonl; "off": none
keep = 10000           # events kept in the store (older ones are pruned)
log_max_bytes = 10000000  # the log is rotated past this size (events.jsonl.1, .2, ...); 0: never
log_backups = 5        # rotated logs kept
"""


class ConfigError(ValueError):
    """The config is not valid; the message names the file and every bad key."""


@dataclass(frozen=True)
class ServicesConfig:
    manifests: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DetectorConfig:
    enabled: bool = False
    workers: int = 2
    queue_size: int = 256
    job_timeout_s: float = 10.0


@dataclass(frozen=True)
class VerifierConfig:
    workers: int = 1
    realtime_priority: int = realtime.PRIORITY


@dataclass(frozen=True)
class FiltersConfig:
    general: bool = True
    expire_after_s: float = 0.0
    workers: int = 1
    tcp_action: str = "reject"
    general_delay_ms: float = 100.0


@dataclass(frozen=True)
class TakeoverConfig:
    policy: str = "scrub"
    reply: str = ""


@dataclass(frozen=True)
class OverlayConfig:
    enabled: bool = True
    bind: tuple[str, int] = ("0.0.0.0", 7400)
    bootstrap: tuple[tuple[str, int], ...] = ()
    serve_first_ms: float = 3.0


@dataclass(frozen=True)
class KernelConfig:
    enabled: bool = True
    fail_open: bool = True
    queue_max_len: int = 4096


@dataclass(frozen=True)
class ThrottleConfig:
    enabled: bool = True
    working_set_size: int = 5
    release_rate: float = 1.0
    threshold: int = 100
    allowlist: tuple[str, ...] = ()
    quarantine_infected: bool = False


@dataclass(frozen=True)
class TracebackConfig:
    router: bool = False
    router_id: int = 0
    links: tuple[dict[str, Any], ...] = ()  # checked by node.traceback.config.Link.from_dict
    fp_rate: float = 0.01
    slice_s: float = 2.0
    max_bytes: int = 64 << 20
    queriers: tuple[str, ...] = ()  # hex
    gateway: tuple[str, int] | None = None
    gateway_key: str = ""


@dataclass(frozen=True)
class ControlConfig:
    socket: Path | None = None


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class EventsConfig:
    log: Path | None = None  # None: no event log file
    keep: int = 10000
    log_max_bytes: int = 10_000_000
    log_backups: int = 5


@dataclass(frozen=True)
class Config:
    state_dir: Path
    services: ServicesConfig = field(default_factory=ServicesConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    takeover: TakeoverConfig = field(default_factory=TakeoverConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    traceback: TracebackConfig = field(default_factory=TracebackConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    source: Path | None = None  # the file it came from, None for the embedded defaults

    @property
    def store_path(self) -> Path:
        return self.state_dir / "herdwall.db"

    @property
    def socket_path(self) -> Path:
        return self.control.socket or self.state_dir / "control.sock"

    def to_json(self) -> dict[str, Any]:
        """The effective config, as plain JSON (what ``herdwall node config`` prints)."""
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) \
                    and isinstance(v[1], int) and not isinstance(v[1], bool):
                return _join_addr(v)
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            return v

        out: dict[str, Any] = {"state_dir": str(self.state_dir),
                               "source": str(self.source) if self.source else None}
        for name in _SCHEMA:
            section = getattr(self, name)
            out[name] = {k: plain(getattr(section, k)) for k in _SCHEMA[name]}
        out["control"]["socket"] = str(self.socket_path)
        return out


# --- checkers: each takes (value, base dir) and returns the parsed value or raises _Bad ----


class _Bad(Exception):
    pass


Checker = Callable[[Any, Path], Any]


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _bool(v: Any, _: Path) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {_kind(v)}")
    return v


def _int(lo: int, hi: int) -> Checker:
    def check(v: Any, _: Path) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Bad(f"must be an integer from {lo} to {hi}, got {v!r}")
        return v
    return check


def _number(lo: float, hi: float, *, lo_open: bool = False) -> Checker:
    def check(v: Any, _: Path) -> float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v \
            and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            low = f"more than {lo}" if lo_open else f"from {lo}"
            raise _Bad(f"must be a number {low} to {hi}, got {v!r}")
        return float(v)
    return check


def _path(*, empty: Any = None, off: bool = False) -> Checker:
    def check(v: Any, base: Path) -> Any:
        if not isinstance(v, str):
            raise _Bad(f"must be a path (a string), got {_kind(v)}")
        if v == "":
            return empty
        if off and v == "off":
            return "off"
        if "\0" in v:
            raise _Bad("must not contain NUL")
        return (base / os.path.expanduser(v)).resolve() if v else empty
    return check


def parse_addr(text: str, *, allow_zero_port: bool) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError with a reason if malformed."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"must be host:port, got {text!r}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be [v6 address]:port, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    if not host or any(c.isspace() for c in host) or len(host) > 253:
        raise ValueError(f"bad host in {text!r}")
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"bad port in {text!r}")
    port = int(port_text)
    if not (0 if allow_zero_port else 1) <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def _join_addr(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addr(*, allow_zero_port: bool = False, empty_ok: bool = False) -> Checker:
    def check(v: Any, _: Path) -> tuple[str, int] | None:
        if not isinstance(v, str):
            raise _Bad(f"must be a \"host:port\" string, got {_kind(v)}")
        if v == "" and empty_ok:
            return None
        try:
            return parse_addr(v, allow_zero_port=allow_zero_port)
        except ValueError as e:
            raise _Bad(str(e)) from None
    return check


def _list(item: Checker, max_items: int) -> Checker:
    def check(v: Any, base: Path) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise _Bad(f"must be an array, got {_kind(v)}")
        if len(v) > max_items:
            raise _Bad(f"at most {max_items} entries, got {len(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x, base))
            except _Bad as e:
                raise _Bad(f"[{i}] {e}") from None
        return tuple(out)
    return check


def _cidr(v: Any, _: Path) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a CIDR string, got {_kind(v)}")
    try:
        return str(ipaddress.ip_network(v, strict=False))
    except ValueError:
        raise _Bad(f"{v!r} is not an address or network") from None


def _choice(*values: str) -> Checker:
    def check(v: Any, _: Path) -> str:
        if not isinstance(v, str) or v not in values:
            raise _Bad(f"must be one of {', '.join(map(repr, values))}, got {v!r}")
        return v
    return check


def _text(max_bytes: int) -> Checker:
    def check(v: Any, _: Path) -> str:
        if not isinstance(v, str):
            raise _Bad(f"must be a string, got {_kind(v)}")
        if len(v.encode("utf-8", "surrogatepass")) > max_bytes:
            raise _Bad(f"at most {max_bytes} bytes")
        return v
    return check


def _tb_link(v: Any, _: Path) -> dict[str, Any]:
    from node.traceback.config import ConfigError as LinkError
    from node.traceback.config import Link

    try:
        return Link.from_dict(v).to_dict()
    except LinkError as e:
        raise _Bad(str(e)) from None


def _node_key(*, empty_ok: bool = False) -> Checker:
    def check(v: Any, _: Path) -> str:
        if empty_ok and v == "":
            return ""
        if not isinstance(v, str) or len(v) != 64 or any(
                c not in "0123456789abcdef" for c in v.lower()):
            raise _Bad("must be a node key: 64 hex digits")
        return v.lower()
    return check


def _manifest(v: Any, base: Path) -> Path:
    p = _path()(v, base)
    if p is None:
        raise _Bad("must not be empty")
    return p


_SCHEMA: dict[str, dict[str, Checker]] = {
    "services": {"manifests": _list(_manifest, 64)},
    "detector": {"enabled": _bool, "workers": _int(1, 64), "queue_size": _int(1, 100_000),
                 "job_timeout_s": _number(0, 3600, lo_open=True)},
    "verifier": {"workers": _int(1, 64),
                 "realtime_priority": _int(0, realtime.MAX_PRIORITY)},
    "filters": {"general": _bool, "expire_after_s": _number(0, 10 * 365 * 86400),
                "workers": _int(1, 64), "tcp_action": _choice("drop", "reject", "takeover"),
                "general_delay_ms": _number(0, 60_000)},
    # A reply goes out in one segment before the FIN: it stays well under any MSS.
    "takeover": {"policy": _choice("scrub", "close", "respond"), "reply": _text(1024)},
    "overlay": {"enabled": _bool, "bind": _addr(allow_zero_port=True),
                "bootstrap": _list(_addr(), 256), "serve_first_ms": _number(0, 1000)},
    "kernel": {"enabled": _bool, "fail_open": _bool, "queue_max_len": _int(1, 1 << 20)},
    "throttle": {"enabled": _bool, "working_set_size": _int(1, 1024),
                 "release_rate": _number(0, 1e6, lo_open=True), "threshold": _int(1, 1 << 20),
                 "allowlist": _list(_cidr, 4096), "quarantine_infected": _bool},
    "traceback": {"router": _bool, "router_id": _int(0, (1 << 14) - 1),
                  "links": _list(_tb_link, 8), "fp_rate": _number(0, 0.2, lo_open=True),
                  "slice_s": _number(0, 3600, lo_open=True), "max_bytes": _int(1 << 20, 1 << 36),
                  "queriers": _list(_node_key(), 1024), "gateway": _addr(empty_ok=True),
                  "gateway_key": _node_key(empty_ok=True)},
    "control": {"socket": _path()},
    "metrics": {"listen": _addr(empty_ok=True)},
    "events": {"log": _path(off=True), "keep": _int(0, 10_000_000),
               "log_max_bytes": _int(0, 1 << 40), "log_backups": _int(0, 1000)},
}
_SECTIONS: dict[str, type] = {
    "services": ServicesConfig, "detector": DetectorConfig, "verifier": VerifierConfig,
    "filters": FiltersConfig, "takeover": TakeoverConfig, "overlay": OverlayConfig,
    "kernel": KernelConfig,
    "throttle": ThrottleConfig, "traceback": TracebackConfig, "control": ControlConfig,
    "metrics": MetricsConfig,
    "events": EventsConfig,
}


def parse_config(doc: dict[str, Any], *, base: Path, source: Path | None = None,
                 state_dir: Path | None = None) -> Config:
    """A ``Config`` from a parsed TOML document. ``state_dir`` (the command line's) wins over
    the file's. Raises ``ConfigError`` naming every bad key."""
    errors: list[str] = []
    sections: dict[str, Any] = {}
    top_state: Path | None = None
    for key, value in doc.items():
        if key == "state_dir":
            try:
                top_state = _path()(value, base)
            except _Bad as e:
                errors.append(f"state_dir: {e}")
        elif key in _SCHEMA:
            if not isinstance(value, dict):
                errors.append(f"{key}: must be a table ([{key}]), got {_kind(value)}")
        else:
            errors.append(f"{key}: unknown {'section' if isinstance(value, dict) else 'key'}"
                          f" (known: state_dir, {', '.join(_SCHEMA)})")
    for name, checkers in _SCHEMA.items():
        given = doc.get(name, {})
        if not isinstance(given, dict):
            continue
        values: dict[str, Any] = {}
        for key, value in given.items():
            check = checkers.get(key)
            if check is None:
                errors.append(f"{name}.{key}: unknown key (known: {', '.join(checkers)})")
                continue
            try:
                values[key] = check(value, base)
            except _Bad as e:
                errors.append(f"{name}.{key}: {e}")
        sections[name] = values
    if errors:
        where = f"{source}: " if source else "config: "
        raise ConfigError(where + "; ".join(errors))
    chosen = state_dir or top_state or default_state_dir()
    log = sections["events"].pop("log", None)
    built = {name: _SECTIONS[name](**values) for name, values in sections.items()}
    if log != "off":
        built["events"] = replace(built["events"],
                                  log=log or chosen / "events.jsonl")
    return Config(state_dir=Path(chosen), source=source, **built)


def load_config(path: Path | str | None = None, *, state_dir: Path | None = None) -> Config:
    """The config from ``path`` (else ``$HERDWALL_CONFIG``, else the embedded defaults)."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else None
    if path is None:
        return parse_config({}, base=Path.cwd(), state_dir=state_dir)
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(doc, base=path.resolve().parent, source=path, state_dir=state_dir)
