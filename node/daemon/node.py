"""The node daemon: one asyncio process that composes the parts (``herdwall node run``).

Start order, and why:

1. state directory (0700), node key (made on first run), protected service images (a bad
   manifest is a config error naming its entry);
2. control socket (refused if another node answers on it, before anything is written), so
   status works from here on;
3. store (refused clearly if corrupt), event log and bus, metrics if configured;
5. kernel: ``NftTable.ensure()`` (``node.kernel``: the table with the stack's chains) *before*
   the filters' chains, since it refuses a table made by someone else; then the filters are
   reconciled with the store (``FilterTable.sync``): a restart, also after kill -9, puts the
   kernel back to what the store says;
6. sandbox pools (workers boot their clones), the pipeline;
7. components (stack, throttle, overlay: ``node.daemon.components``).

SIGTERM or SIGINT stops in reverse order and exits 0, leaving the filters in the kernel (the
queue rules fail open, so a stopped node never blackholes traffic). ``teardown()`` removes what
herdwall put in the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sca.emu.image import ManifestError, ServiceImage, load_image
from sca.keys import KEY_FILE, KeyFileError, NodeKey

from . import realtime
from .components import (
    Component,
    ComponentFactory,
    HasStatus,
    PeerInfo,
    ThrottleHooks,
    build_components,
)
from .config import Config, ConfigError
from .control import CommandError, ControlServer
from .events import EventBus, EventLog, Record
from .filters import FilterBackend, FilterManager, table_action
from .pipeline import Broadcast, Handoff, Pipeline
from .pools import Pools
from .store import Store, StoreRunner

TICK_S = 0.5
MAX_IDS = 10_000
GIL_SWITCH_S = 0.0005


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("herdwall")
    except metadata.PackageNotFoundError:
        return "unknown"


def load_or_make_key(state_dir: Path) -> tuple[NodeKey, bool]:
    """The node key, made (mode 0600) on first run; True if it was made now."""
    if not (state_dir / KEY_FILE).exists():
        key = NodeKey.generate()
        try:
            key.save(state_dir)
            return key, True
        except KeyFileError:
            pass  # another process made one in between: use that
    return NodeKey.load(state_dir), False


def load_images(config: Config) -> list[ServiceImage]:
    images: list[ServiceImage] = []
    seen: dict[tuple[str, int], str] = {}
    for i, path in enumerate(config.services.manifests):
        try:
            img = load_image(path)
        except ManifestError as e:
            raise ConfigError(f"{config.source or 'config'}: services.manifests[{i}]: {e}"
                              ) from None
        where = (img.proto, img.port)
        if where in seen or img.name in {x.name for x in images}:
            raise ConfigError(f"{config.source or 'config'}: services.manifests[{i}]: "
                              f"{img.name} ({img.proto}/{img.port}) clashes with "
                              f"{seen.get(where, img.name)}")
        seen[where] = img.name
        images.append(img)
    return images


def kernel_filter_backend(tcp_action: str = "reject") -> FilterBackend:
    """``tcp_action``: the config's ``filters.tcp_action`` (listing and removing need none)."""
    from filters.nft import FilterTable
    from node.kernel.marks import MASK, QUEUE_STACK
    from node.kernel.nft import NftTable

    # A libnftables context of its own: the filter manager drives it from its own thread, and
    # a context must not be shared between threads.
    nft = NftTable()
    # User-space filters mark their port's packets for the stack's queue.
    return FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK,
                       **table_action(tcp_action))


class Node:
    """One node. ``filter_backend``: "auto" (libnftables when ``kernel.enabled``), None (no
    kernel filters) or an object (tests). ``components``: a factory (default
    ``build_components``)."""

    def __init__(self, config: Config, *, filter_backend: Any = "auto",
                 components: ComponentFactory | None = None) -> None:
        self.config = config
        self._backend_choice = filter_backend
        self._factory = components or build_components
        self.state = "new"
        self.started_at = 0.0
        self.key: NodeKey | None = None
        self.key_created = False
        self.images: list[ServiceImage] = []
        self.db: StoreRunner | None = None
        self.bus = EventBus()
        self.metrics: Any = None
        self.control: ControlServer | None = None
        self.nft: Any = None
        self.kernel: dict[str, Any] = {"enabled": config.kernel.enabled, "ok": None,
                                       "error": ""}
        self.filters: FilterManager | None = None
        self.pools: Pools | None = None
        self.pipeline: Pipeline | None = None
        self.components: list[Component] = []
        self.component_state: dict[str, str] = {}
        self._peers_fn: Any = None
        self.throttle: ThrottleHooks | None = None
        self._stop = asyncio.Event()
        self._pending: list[Record] = []
        self._ticker: asyncio.Task[Any] | None = None
        self._gauges: dict[str, float] = {}
        self._hits_total: int | None = None
        self._filters_installed = 0

    # --- hooks for components ---------------------------------------------------------------

    def set_broadcast(self, fn: Broadcast | None) -> None:
        assert self.pipeline is not None
        self.pipeline.broadcast = fn

    def set_handoff(self, fn: Handoff | None) -> None:
        """``Overlay.handed_over``: a verified alert's own work waits for its hand-off."""
        assert self.pipeline is not None
        self.pipeline.handoff = fn

    def set_peers(self, fn: Any) -> None:
        self._peers_fn = fn

    def set_throttle(self, hooks: ThrottleHooks | None) -> None:
        self.throttle = hooks

    async def host_flagged(self, host: str, detail: str = "") -> bool:
        """The throttle flagged ``host`` as infected: record, report, and quarantine it if
        configured. Returns True if it was quarantined."""
        assert self.db is not None
        await self.db(self.db.store.flag_host, host, detail)
        self.bus.emit("throttle.flagged", host=host, detail=detail)
        if not self.config.throttle.quarantine_infected:
            return False
        q = getattr(self.throttle, "quarantine", None)
        if q is None:
            self.bus.emit("throttle.error", host=host,
                          error="quarantine configured but the throttle offers none")
            return False
        try:
            r = q(host)
            if asyncio.iscoroutine(r):
                await r
        except Exception as e:
            self.bus.emit("throttle.error", host=host, error=f"quarantine: {e!r}")
            return False
        self.bus.emit("throttle.quarantined", host=host)
        return True

    async def host_cleared(self, host: str) -> None:
        assert self.db is not None
        await self.db(self.db.store.clear_host, host)
        self.bus.emit("throttle.cleared", host=host)

    def peers(self) -> list[PeerInfo]:
        """The live peers from ``set_peers``: ``PeerInfo``, (node id, host, port) tuples, or
        ``overlay.Peer`` objects (``node_id`` bytes, ``addr`` (host, port))."""
        if self._peers_fn is None:
            return []
        try:
            return [_peer_info(p) for p in self._peers_fn()]
        except Exception:
            return []

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.state = "starting"
        self.started_at = time.time()
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(cfg.state_dir, 0o700)
        self.key, self.key_created = load_or_make_key(cfg.state_dir)
        self.images = load_images(cfg)
        # The control socket first: a second node on the same state directory stops here,
        # before it writes a line to the running node's event log or store.
        self.control = ControlServer(cfg.socket_path, self.handle, self.bus)
        await self.control.start()
        store = Store(cfg.store_path)
        self.db = StoreRunner(store)
        if cfg.events.log is not None:
            self.bus.log = EventLog(cfg.events.log, cfg.events.log_max_bytes,
                                    cfg.events.log_backups)
        self.bus.subscribe(self._persist)
        if cfg.metrics.listen is not None:
            from .metrics import Metrics

            self.metrics = Metrics(self.bus, lambda: self._gauges)
            self.metrics.serve(*cfg.metrics.listen)
        backend = self._backend()
        self.filters = FilterManager(backend, self.db, self.bus,
                                     expire_after_s=cfg.filters.expire_after_s)
        await self.filters.reconcile()
        self.pools = Pools(cfg.services.manifests, fast_workers=cfg.verifier.workers,
                           detect_workers=cfg.detector.workers,
                           filter_workers=cfg.filters.workers, detectors=cfg.detector.enabled,
                           fast_priority=cfg.verifier.realtime_priority)
        await self.pools.warm()
        self.pipeline = Pipeline(
            key=self.key, images=self.images, pools=self.pools, db=self.db, bus=self.bus,
            filters=self.filters, detector=cfg.detector.enabled,
            queue_size=cfg.detector.queue_size, job_timeout_s=cfg.detector.job_timeout_s,
            general_filters=cfg.filters.general, detect_concurrency=cfg.detector.workers,
            general_delay_s=cfg.filters.general_delay_ms / 1000,
            serve_first_s=cfg.overlay.serve_first_ms / 1000)
        await self.pipeline.start()
        for comp in self._factory(self):
            self.components.append(comp)
            try:
                await comp.start()
                self.component_state[comp.name] = "running"
            except Exception as e:
                self.component_state[comp.name] = f"failed: {e}"
                self.bus.emit("component.error", component=comp.name, error=repr(e))
        self._ticker = asyncio.create_task(self._tick(), name="ticker")
        self.state = "running"
        self.bus.emit("node.started", node_id=self.key.node_id.hex(), pid=os.getpid(),
                      services=[i.name for i in self.images], key_created=self.key_created,
                      detector=cfg.detector.enabled, kernel=self.kernel)

    def _backend(self) -> FilterBackend | None:
        if self._backend_choice != "auto":
            self.kernel["ok"] = self._backend_choice is not None
            return self._backend_choice  # type: ignore[no-any-return]
        if not self.config.kernel.enabled:
            return None
        try:
            from node.kernel.nft import NftTable

            self.nft = NftTable()
            self.nft.ensure()
            backend = kernel_filter_backend(self.config.filters.tcp_action)
            self.kernel["ok"] = True
            return backend
        except Exception as e:
            self.kernel.update(ok=False, error=str(e) or repr(e))
            self.bus.emit("kernel.error", error=self.kernel["error"])
            return None

    async def stop(self) -> None:
        if self.state in ("stopping", "stopped"):
            return
        self.state = "stopping"
        self.bus.emit("node.stopping")
        for comp in reversed(self.components):
            try:
                await asyncio.wait_for(comp.stop(), 10)
                self.component_state[comp.name] = "stopped"
            except Exception as e:
                self.bus.emit("component.error", component=comp.name, error=repr(e))
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.control is not None:
            await self.control.stop()
        if self.pools is not None:
            self.pools.shutdown()  # here, on the loop: no job can slip past it
            await asyncio.to_thread(self.pools.close)
        self.bus.emit("node.stopped")
        await self._flush()
        if self.filters is not None:
            self.filters.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.db is not None:
            await asyncio.to_thread(self.db.close)
        self.bus.close()
        self.state = "stopped"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, run until SIGTERM/SIGINT (or ``request_stop``), stop."""
        # The loop shares the GIL with the store's, the kernel's and the pools' threads; at the
        # default 5 ms switch interval every hand-over to the loop (a verdict back from the
        # pool, a committed write) could wait that long, on every hop of an alert.
        sys.setswitchinterval(GIL_SWITCH_S)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # --- background -------------------------------------------------------------------------

    def _persist(self, rec: Record) -> None:
        if len(self._pending) < 10_000:
            self._pending.append(rec)

    async def _flush(self) -> None:
        if self._pending and self.db is not None and self.config.events.keep > 0:
            batch, self._pending = self._pending, []
            with contextlib.suppress(Exception):
                await self.db(self.db.store.record_events, batch, self.config.events.keep)

    async def _tick(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(TICK_S)
            n += 1
            try:
                await self._flush()
                if n % 2 == 0:
                    await self._sample_hits()
                    self._update_gauges()
                if n % 20 == 0 and self.filters is not None:
                    await self.filters.expire()
                    await self._save_peers()
                if n % 60 == 0 and self.filters is not None \
                        and not await self.filters.in_step():
                    await self.filters.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.bus.emit("node.error", where="ticker", error=repr(e))

    async def _sample_hits(self) -> None:
        assert self.filters is not None
        counters = await self.filters.counters()
        self._filters_installed = len(counters)
        total = sum(p for p, _ in counters.values())
        if self._hits_total is not None and total > self._hits_total:
            self.bus.count("filter.hits", total - self._hits_total)
        self._hits_total = total

    async def _save_peers(self) -> None:
        peers = self.peers()
        if peers and self.db is not None:
            await self.db(self.db.store.record_peers,
                          [(p.node_id, p.host, p.port) for p in peers])

    def _update_gauges(self) -> None:
        if self.pipeline is None:
            return
        st = self.pipeline.status()
        self._gauges = {
            "detector_queue": st["detector"]["queue"],
            "detector_sampled_out": st["detector"]["sampled_out"],
            "detector_analysed": st["detector"]["analysed"],
            "verifier_last_ms": st["verifier"]["last_ms"],
            "peers": len(self.peers()),
            "alerts_verified": self.bus.counts.get("alert.verified", 0)
            + self.bus.counts.get("alert.detected", 0),
            "alerts_refuted": self.bus.counts.get("alert.refuted", 0),
            "filters_installed": self._filters_installed,
            "throttle_flagged": self.bus.counts.get("throttle.flagged", 0)
            - self.bus.counts.get("throttle.cleared", 0),
        }

    # --- control requests -------------------------------------------------------------------

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        fn = _COMMANDS.get(cmd)
        if fn is None:
            raise CommandError(f"unknown command {cmd!r} (known: {', '.join(_COMMANDS)})")
        if self.state != "running" and cmd not in ("ping", "status"):
            raise CommandError(f"the node is {self.state}")
        return await fn(self, args)

    async def _cmd_ping(self, args: dict[str, Any]) -> str:
        return "pong"

    async def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {
            "node": {
                "id": self.key.node_id.hex() if self.key else None,
                "public_key": self.key.public_bytes.hex() if self.key else None,
                "state": self.state, "pid": os.getpid(), "version": version(),
                "started_at": self.started_at, "uptime_s": round(now - self.started_at, 1),
                "state_dir": str(self.config.state_dir),
                "config": str(self.config.source) if self.config.source else None,
                "socket": str(self.config.socket_path),
                "event_log": str(self.config.events.log) if self.config.events.log else None,
                "metrics": _addr(self.config.metrics.listen),
                "overlay_bind": _addr(self.config.overlay.bind),
                "realtime_priority": realtime.current(),  # the loop's: 0 normal scheduling
                "bootstrap": [_addr(b) for b in self.config.overlay.bootstrap],
            },
            "kernel": dict(self.kernel),
            "components": [{"name": c.name, "state": self.component_state.get(c.name, "?"),
                            **({"status": _safe_status(c)} if isinstance(c, HasStatus)
                               else {})} for c in self.components],
            "rates": self.bus.rates.snapshot(now),
            "events": list(self.bus.recent)[-20:],
        }
        if self.state != "running" or self.db is None:
            return out
        assert self.pipeline is not None and self.filters is not None
        out["alerts"] = await self.db(self.db.store.alert_counts)
        filters = await self.filters.listing()
        out["filters"] = {"installed": len(filters), "kernel_errors": self.filters.kernel_errors,
                          "last_error": self.filters.last_error,
                          "userspace": len(self.filters.userspace), "list": filters[:500]}
        out["peers"] = await self._cmd_peers({})
        out["throttle"] = await self._throttle_status()
        out.update(self.pipeline.status())
        out["control"] = {"clients": self.control.clients if self.control else 0,
                          "requests": self.control.requests if self.control else 0}
        return out

    async def _throttle_status(self) -> dict[str, Any]:
        assert self.db is not None
        flags = await self.db(self.db.store.throttle_flags, flagged_only=True)
        if self.throttle is None:
            return {"wired": False, "enabled": self.config.throttle.enabled, "flags": flags}
        try:
            st = dict(self.throttle.throttle_status())
        except Exception as e:
            st = {"error": repr(e)}
        return {"wired": True, "enabled": self.config.throttle.enabled, "flags": flags, **st}

    async def _cmd_alerts(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.db is not None
        state = args.get("state")
        if state is not None and state not in ("received", "verified", "refuted", "forwarded"):
            raise CommandError("state must be received, verified, refuted or forwarded")
        limit = _int_arg(args, "limit", 1000, 1, 100_000)
        return [r.to_json() for r in await self.db(self.db.store.alerts, state=state,
                                                    limit=limit)]

    async def _cmd_alert(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.db is not None
        aid = args.get("id")
        if not isinstance(aid, str):
            raise CommandError("id must be an alert id (hex) or a prefix of one")
        try:
            row = await self.db(self.db.store.find_alert, aid)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if row is None:
            raise CommandError(f"no alert {aid}")
        return alert_detail(self.db.store, row)

    async def _cmd_filters(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.filters is not None
        return await self.filters.listing(all_states=bool(args.get("all")))

    async def _cmd_filter_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.filters is not None
        ids = args.get("ids")
        if not (isinstance(ids, list) and 0 < len(ids) <= MAX_IDS
                and all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)):
            raise CommandError("ids must be a list of filter ids")
        removed = await self.filters.remove(ids, by="operator")
        missing = [i for i in ids if i not in removed]
        if missing and not removed:
            raise CommandError(f"no installed filter with id {', '.join(missing[:10])}")
        return {"removed": removed, "missing": missing}

    async def _cmd_peers(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        live = self.peers()
        if live or self._peers_fn is not None:
            return [{"node_id": p.node_id, "host": p.host, "port": p.port, "live": True}
                    for p in live]
        assert self.db is not None
        return [{**p, "live": False} for p in await self.db(self.db.store.peers)]

    async def _cmd_throttle(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._throttle_status()

    async def _cmd_throttle_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        host = args.get("host")
        try:
            host = str(ipaddress.ip_address(host))  # type: ignore[arg-type]
        except ValueError:
            raise CommandError(f"host must be an IP address, got {host!r}") from None
        if self.throttle is None:
            raise CommandError("the throttle is off in this node's config; nothing to clear"
                               if not self.config.throttle.enabled else
                               "the throttle is not running in this node (not wired, or it "
                               "failed to start); nothing to clear")
        try:
            r = self.throttle.clear(host)
            if asyncio.iscoroutine(r):
                await r
        except (ValueError, KeyError) as e:
            raise CommandError(f"cannot clear {host}: {e}") from None
        await self.host_cleared(host)
        return {"cleared": host}

    async def _cmd_events(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        limit = _int_arg(args, "limit", 100, 1, 10_000)
        kind = args.get("type")
        recent = [r for r in self.bus.recent
                  if not isinstance(kind, str) or str(r.get("event_type", "")).startswith(kind)]
        return recent[-limit:]

    async def _cmd_alert_import(self, args: dict[str, Any]) -> dict[str, Any]:
        """An envelope given by an operator: the same path as one from a peer (our own
        sandbox decides), then published if it verified and an overlay is wired."""
        assert self.pipeline is not None
        data = _hex_arg(args, "envelope")
        d = await self.pipeline.on_overlay_alert(data, "operator", origin="import")
        if d.forward and self.pipeline.broadcast is not None:
            await self.pipeline._broadcast(d.alert_id, data)
        return d.__dict__

    async def _cmd_detector_submit(self, args: dict[str, Any]) -> str:
        """Messages for a protected service, as if the stack had seen them (tools, tests):
        ``{"service": "resolver", "messages": [[null, "hex"], [0, "hex"], ...],
        "packets": [["hex", ...], ...]}`` (optional: the raw packets of each message)."""
        from sca.alert import Message

        assert self.pipeline is not None
        service, raw = args.get("service"), args.get("messages")
        if not isinstance(service, str) or not isinstance(raw, list) or not raw:
            raise CommandError("service (string) and messages (list) are required")
        msgs = []
        for m in raw[:64]:
            if not (isinstance(m, list) and len(m) == 2 and isinstance(m[1], str)
                    and (m[0] is None or (isinstance(m[0], int) and not isinstance(m[0], bool)
                                          and 0 <= m[0] < 1 << 16))):
                raise CommandError("each message is [connection or null, hex bytes]")
            try:
                msgs.append(Message(bytes.fromhex(m[1]), m[0]))
            except ValueError:
                raise CommandError("message bytes must be hex") from None
        packets = args.get("packets", [])
        if not (isinstance(packets, list) and all(
                isinstance(per, list) and all(isinstance(x, str) for x in per)
                for per in packets)):
            raise CommandError("packets must be a list of lists of hex strings")
        try:
            pk = [[bytes.fromhex(x) for x in per[:64]] for per in packets[:64]]
        except ValueError:
            raise CommandError("packets must be hex") from None
        return self.pipeline.submit_messages(service, msgs, pk)

    async def _cmd_reconcile(self, args: dict[str, Any]) -> dict[str, int]:
        assert self.filters is not None
        return await self.filters.reconcile()


def _peer_info(p: Any) -> PeerInfo:
    if isinstance(p, PeerInfo):
        return p
    if hasattr(p, "node_id") and hasattr(p, "addr"):
        nid = p.node_id.hex() if isinstance(p.node_id, bytes) else str(p.node_id)
        return PeerInfo(nid, str(p.addr[0]), int(p.addr[1]))
    nid, host, port = p
    return PeerInfo(nid.hex() if isinstance(nid, bytes) else str(nid), str(host), int(port))


def _addr(a: tuple[str, int] | None) -> str | None:
    if a is None:
        return None
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _int_arg(args: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = args.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CommandError(f"{name} must be an integer from {lo} to {hi}")
    return v


def _hex_arg(args: dict[str, Any], name: str, limit: int = 1 << 20) -> bytes:
    v = args.get(name)
    if not isinstance(v, str) or len(v) > 2 * limit:
        raise CommandError(f"{name} must be hex bytes (at most {limit})")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise CommandError(f"{name} must be hex bytes") from None


def _safe_status(c: Any) -> dict[str, Any]:
    try:
        return dict(c.status())
    except Exception as e:
        return {"error": repr(e)}


def alert_detail(store: Store, row: Any) -> dict[str, Any]:
    """An alert row with its verdicts, packet count and bytes (hex), for ``alert show``."""
    d = row.to_json()
    d["verifications"] = [v.__dict__ for v in store.verifications(row.alert_id)]
    d["packets"] = len(store.packets(row.alert_id))
    d["alert_hex"] = row.alert.hex()
    d["envelope_hex"] = row.envelope.hex() if row.envelope else None
    d["filters"] = [f.to_json() for f in store.filters() if f.alert_id == row.alert_id]
    return d


_COMMANDS = {
    "ping": Node._cmd_ping,
    "status": Node._cmd_status,
    "alerts": Node._cmd_alerts,
    "alert": Node._cmd_alert,
    "filters": Node._cmd_filters,
    "filter.remove": Node._cmd_filter_remove,
    "peers": Node._cmd_peers,
    "throttle": Node._cmd_throttle,
    "throttle.clear": Node._cmd_throttle_clear,
    "events": Node._cmd_events,
    "reconcile": Node._cmd_reconcile,
    "alert.import": Node._cmd_alert_import,
    "detector.submit": Node._cmd_detector_submit,
}


def teardown(*, netns: str | None = None) -> dict[str, Any]:
    """Remove everything herdwall put in the kernel: table ``inet herdwall`` (filters, the
    stack's and the throttle's chains and sets) and the static NFQUEUE rules."""
    from node.kernel.marks import ALL_QUEUES
    from node.kernel.nft import NftTable
    from node.kernel.queue_rules import QueueRules

    table = NftTable(netns=netns).teardown()
    rules = QueueRules(netns=netns, queues=ALL_QUEUES).remove()
    return {"table_removed": table, "queue_rules_removed": rules}


def run_node(config: Config, components: Iterable[Component] | None = None) -> None:
    """``herdwall node run``: the blocking entry point."""
    node = Node(config, components=(lambda _n: list(components)) if components else None)
    asyncio.run(node.run())
