"""Optional Prometheus metrics (``[metrics] listen = "127.0.0.1:9477"``; off by default).

Counters follow the event bus (one increment per event type, so the names stay few and fixed:
``herdwall_events_total{type="alert.verified"}``); gauges are read from the node's status when
Prometheus scrapes, not kept up to date by hand. prometheus-client serves HTTP from its own
thread; the gauge callbacks only read plain attributes, which is safe from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .events import EventBus, Record


class Metrics:
    def __init__(self, bus: EventBus, gauges: Callable[[], dict[str, float]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.events = Counter("herdwall_events", "Events by type", ["type"],
                              registry=self.registry)
        self._gauges = gauges
        self._gauge: dict[str, Any] = {}
        for name, help_text in (
            ("alerts_verified", "Alerts stored as verified or forwarded"),
            ("alerts_refuted", "Alerts stored as refuted"),
            ("filters_installed", "Filters installed"),
            ("detector_queue", "Submissions waiting for taint replay"),
            ("detector_sampled_out", "Submissions dropped by the sampling policy"),
            ("detector_analysed", "Submissions replayed with taint"),
            ("verifier_last_ms", "Last verification time in milliseconds"),
            ("peers", "Overlay peers"),
            ("throttle_flagged", "Hosts flagged as infected"),
        ):
            g = Gauge(f"herdwall_{name}", help_text, registry=self.registry)
            g.set_function(self._reader(name))
            self._gauge[name] = g
        self._server: Any = None
        bus.subscribe(self._on_event)

    def _reader(self, name: str) -> Callable[[], float]:
        def read() -> float:
            try:
                return float(self._gauges().get(name, 0.0))
            except Exception:
                return float("nan")
        return read

    def _on_event(self, rec: Record) -> None:
        self.events.labels(type=str(rec.get("event_type", "?"))[:64]).inc()

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else None
        if server is not None:
            server.shutdown()
            server.server_close()
