"""The Node in this process with fake components: the hooks the stack, throttle and overlay
use, the control commands behind them, events kept in the store, metrics."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node.daemon.components import PeerInfo
from node.daemon.config import parse_config
from node.daemon.control import ControlClient, ControlError
from node.daemon.node import Node
from sca.services import manifest_path, traffic


class FakeThrottle:
    name = "throttle"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.flagged: set[str] = set()
        self.quarantined: list[str] = []
        self.started = False

    async def start(self) -> None:
        self.started = True
        self.node.set_throttle(self)

    async def stop(self) -> None:
        self.started = False

    def status(self) -> dict[str, Any]:
        return {"started": self.started}

    def throttle_status(self) -> dict[str, Any]:
        return {"sources": [{"host": h, "working_set": [], "queue": 101, "flagged": True}
                            for h in sorted(self.flagged)],
                "delayed": 101 * len(self.flagged), "flagged": sorted(self.flagged)}

    async def clear(self, host: str) -> None:
        if host not in self.flagged:
            raise ValueError("not flagged")
        self.flagged.discard(host)

    def quarantine(self, host: str) -> None:
        self.quarantined.append(host)


class FakeOverlay:
    name = "overlay"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.published: list[bytes] = []

    async def start(self) -> None:
        self.node.set_broadcast(self.published.append)
        from overlay.dht import Peer

        self.node.set_peers(lambda: [PeerInfo("ee" * 20, "10.77.0.3", 7400),
                                     Peer(b"\xff" * 20, ("10.77.0.4", 7401), 0)])

    async def stop(self) -> None:
        pass


class Broken:
    name = "stack"

    async def start(self) -> None:
        raise OSError("no NFQUEUE here")

    async def stop(self) -> None:
        pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_node_with_fake_components(tmp_path: Path, fake_table: Any) -> None:
    port = free_port()
    cfg = parse_config({
        "kernel": {"enabled": False}, "overlay": {"enabled": False},
        "services": {"manifests": [str(manifest_path("resolver"))]},
        "detector": {"enabled": True},
        "throttle": {"quarantine_infected": True},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "filters": {"general": False},
    }, base=tmp_path, state_dir=tmp_path / "st")
    made: dict[str, Any] = {}

    def components(node: Node) -> list[Any]:
        made["throttle"], made["overlay"] = FakeThrottle(node), FakeOverlay(node)
        return [Broken(), made["throttle"], made["overlay"]]

    node = Node(cfg, filter_backend=fake_table, components=components)
    sock = cfg.socket_path

    def ask(cmd: str, **args: Any) -> Any:
        with ControlClient(sock) as c:
            return c.request(cmd, **args)

    async def main() -> None:
        await node.start()
        call = asyncio.to_thread
        st = await call(ask, "status")
        states = {c["name"]: c["state"] for c in st["components"]}
        assert states["stack"].startswith("failed: no NFQUEUE")  # reported, node runs on
        assert states["throttle"] == "running" and states["overlay"] == "running"
        assert {c["name"]: c.get("status") for c in st["components"]}["throttle"] == \
            {"started": True}
        assert [p["host"] for p in await call(ask, "peers")] == ["10.77.0.3", "10.77.0.4"]

        # Detection through the pipeline hook the stack uses; published through the overlay.
        assert node.pipeline is not None
        msgs = tuple(traffic("resolver").exploit(random.Random(2)))
        assert node.pipeline.service_for(17, 1434) == "resolver"
        assert node.pipeline.submit_messages("resolver", msgs) == "queued"
        await node.pipeline.idle(60)
        assert len(made["overlay"].published) == 1
        alerts = await call(ask, "alerts")
        assert alerts[0]["state"] == "forwarded" and len(fake_table.installed) == 1

        # The throttle flags a host: stored, reported, quarantined by config; cleared by an
        # operator through the control socket.
        made["throttle"].flagged.add("10.77.0.66")
        assert await node.host_flagged("10.77.0.66", "queue over 100") is True
        assert made["throttle"].quarantined == ["10.77.0.66"]
        t = await call(ask, "throttle")
        assert t["wired"] and t["flagged"] == ["10.77.0.66"]
        assert [f["host"] for f in t["flags"]] == ["10.77.0.66"]
        assert await call(ask, "throttle.clear", host="10.77.0.66") == {"cleared": "10.77.0.66"}
        with pytest.raises(ControlError, match="cannot clear"):
            await call(ask, "throttle.clear", host="10.77.0.66")
        with pytest.raises(ControlError, match="must be an IP address"):
            await call(ask, "throttle.clear", host="; rm -rf /")
        assert (await call(ask, "throttle"))["flags"] == []

        # Events: in the recent list, and Prometheus sees them.
        kinds = [e["event_type"] for e in await call(ask, "events", limit=200)]
        for k in ("node.started", "component.error", "alert.detected", "alert.forwarded",
                  "throttle.flagged", "throttle.quarantined", "throttle.cleared"):
            assert k in kinds, k
        await asyncio.sleep(1.2)  # a tick: gauges updated, events flushed to the store
        body = (await call(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read())).decode()
        assert 'herdwall_events_total{type="alert.detected"} 1.0' in body
        assert "herdwall_peers 2.0" in body
        assert "herdwall_detector_analysed 1.0" in body
        node.request_stop()
        await node.stop()

    asyncio.run(main())
    assert node.state == "stopped" and not sock.exists()
    from node.daemon.store import Store

    with Store(cfg.store_path) as s:
        kept = [e["event_type"] for e in s.events(limit=1000)]
        assert "alert.detected" in kept and kept[-1] == "node.stopped"
        assert {p["node_id"] for p in s.peers()} <= {"ee" * 20, "ff" * 20}
        assert s.throttle_flags()[0]["state"] == "cleared"


def test_clear_without_a_throttle_is_a_clear_error(tmp_path: Path) -> None:
    # In this process, so in the machine's own namespace: no kernel, no overlay, no real
    # components at all.
    cfg = parse_config({"kernel": {"enabled": False}, "overlay": {"enabled": False}},
                       base=tmp_path, state_dir=tmp_path / "st")
    node = Node(cfg, filter_backend=None, components=lambda _node: [])

    def ask(cmd: str, **args: Any) -> Any:
        with ControlClient(cfg.socket_path) as c:
            return c.request(cmd, **args)

    async def main() -> None:
        await node.start()
        try:
            with pytest.raises(ControlError, match="throttle is not running in this node"):
                await asyncio.to_thread(ask, "throttle.clear", host="10.77.0.1")
            st = await asyncio.to_thread(ask, "status")
            assert st["throttle"]["wired"] is False and st["kernel"]["ok"] is False
        finally:
            await node.stop()

    asyncio.run(main())
