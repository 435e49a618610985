"""One frame of the monitor, from a status snapshot: pure, no I/O.

Everything shown may come from hostile peers (service names, reasons, addresses): it only
ever goes into ``rich.text.Text`` objects, never into markup strings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

BARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 30


@dataclass
class Snapshot:
    socket: Path
    status: dict[str, Any] | None = None  # None: no node answers
    error: str = ""
    busy: bool = False  # with no status: a node is there but gave ``error`` (too many clients)
    events: Sequence[dict[str, Any]] = field(default_factory=list)
    now: float = 0.0
    interval: float = 1.0
    width: int = 160  # the terminal's: below NARROW the panels stack instead of pairing
    live: bool = True  # refreshed every ``interval`` (False: one frame, --once)


NARROW = 110


def spark(values: Sequence[int], width: int = SPARK_WIDTH) -> Text:
    """A sparkline of the last ``width`` values, scaled to their maximum; zeros as a low dot."""
    vals = list(values)[-width:]
    vals = [0] * (width - len(vals)) + vals
    top = max(vals) if vals else 0
    out = Text()
    for v in vals:
        if v <= 0 or top == 0:
            out.append("·", style="dim")
        else:
            out.append(BARS[min(len(BARS) - 1, (v * len(BARS) - 1) // top)], style="cyan")
    return out


def _rate(status: dict[str, Any], name: str) -> list[int]:
    series = status.get("rates", {}).get(name)
    return list(series) if isinstance(series, list) else []


def _per_min(series: list[int]) -> str:
    return f"{sum(series)}/min"


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def _uptime(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _kv(rows: Sequence[tuple[str, Any]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v if isinstance(v, Text) else Text(str(v)))
    return t


def _identity(s: dict[str, Any], now: float) -> Panel:
    nd = s["node"]
    peers = s.get("peers", [])
    rows: list[tuple[str, Any]] = [
        ("node", Text(str(nd.get("id")))),
        ("state", f"{nd.get('state')}, up {_uptime(nd.get('uptime_s', 0))}, pid {nd.get('pid')}"),
        ("overlay", f"bind {nd.get('overlay_bind')}, {len(peers)} peer(s)"),
    ]
    k = s.get("kernel", {})
    rows.append(("kernel", Text("off") if not k.get("enabled") else
                 Text("ok", style="green") if k.get("ok") else
                 Text(f"unavailable: {k.get('error')}", style="red")))
    comps = s.get("components", [])
    rows.append(("components", Text(", ".join(f"{c.get('name')} {c.get('state')}"
                                              for c in comps) or "none wired yet")))
    peer_t = Table("peer", "address", box=None, pad_edge=False, show_edge=False)
    for p in peers[:6]:
        peer_t.add_row(Text(str(p.get("node_id", ""))[:16]),
                       Text(f"{p.get('host')}:{p.get('port')}"))
    if len(peers) > 6:
        peer_t.add_row(Text(f"… {len(peers) - 6} more", style="dim"), Text(""))
    body: list[RenderableType] = [_kv(rows)]
    if peers:
        body.append(peer_t)
    return Panel(Group(*body), title="identity and peers", title_align="left")


def _alerts(s: dict[str, Any], spark_width: int = SPARK_WIDTH) -> Panel:
    a = s.get("alerts", {})
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(justify="right")
    t.add_column(no_wrap=True)
    t.add_column(justify="right", style="dim")
    lines = [("received", "from_peers", ("alerts.received",)),
             ("verified", "verified_total", ("alert.verified", "alert.detected")),
             ("refuted", "refuted", ("alert.refuted",)),
             ("forwarded", "forwarded", ("alert.forwarded",)),
             ("detected here", "detected", ("alert.detected",))]
    for label, key, rates in lines:
        series = [sum(x) for x in zip(*(_rate(s, r) or [0] * 60 for r in rates),
                                      strict=False)]
        t.add_row(label, str(a.get(key, 0)), spark(series, spark_width), _per_min(series))
    if a.get("received"):
        t.add_row(Text("unverifiable", style="dim"), str(a["received"]), Text(""), "")
    return Panel(t, title="alerts (last minute)", title_align="left")


def _filters(s: dict[str, Any]) -> Panel:
    f = s.get("filters", {})
    rows = f.get("list", [])
    t = Table("filter", "kind", "service", "port", "packets", "bytes", box=None,
              pad_edge=False, show_edge=False)
    for r in sorted(rows, key=lambda r: -int(r.get("packets", 0)))[:10]:
        t.add_row(Text(str(r.get("filter_id"))), Text(str(r.get("kind"))),
                  Text(str(r.get("service"))), Text(f"{r.get('proto')}/{r.get('port')}"),
                  Text(str(r.get("packets", 0)), style="bold" if r.get("packets") else ""),
                  str(r.get("bytes", 0)))
    hits = _rate(s, "filter.hits")
    head = Text(f"{f.get('installed', 0)} installed ({f.get('userspace', 0)} user space), "
                f"hits ")
    head.append_text(spark(hits, 20))
    head.append(f" {_per_min(hits)}")
    body: list[RenderableType] = [head]
    if f.get("kernel_errors"):
        body.append(Text(f"{f['kernel_errors']} kernel error(s): {f.get('last_error', '')}",
                         style="red"))
    if rows:
        body.append(t)
        if len(rows) > 10:
            body.append(Text(f"… {len(rows) - 10} more (herdwall filter list)", style="dim"))
    return Panel(Group(*body), title="filters", title_align="left")


def _detector(s: dict[str, Any], now: float, spark_width: int = SPARK_WIDTH) -> Panel:
    d = s.get("detector", {})
    v = s.get("verifier", {})
    if d.get("enabled"):
        depth = ", ".join(f"{k} {n}" for k, n in (d.get("depth") or {}).items())
        rows: list[tuple[str, Any]] = [
            ("queue", f"{d.get('queue', 0)}/{d.get('capacity', 0)}"
                      + (f" ({depth})" if depth else "") + f", {d.get('busy', 0)} replaying"),
            ("replayed", Text(f"{d.get('analysed', 0)} ").append_text(
                spark(_rate(s, "detector.analysed"), spark_width))),
            ("offered", Text(f"{d.get('offered', 0)} ").append_text(
                spark(_rate(s, "detector.offered"), spark_width))),
            ("sampled out", Text(f"{d.get('sampled_out', 0)} ").append_text(
                spark(_rate(s, "detector.sampled_out"), spark_width))),
            ("detections", f"{d.get('detections', 0)} ({d.get('alerts', 0)} alert(s))"),
            ("replay time", f"last {d.get('last_ms', 0):.1f} ms, mean {d.get('avg_ms', 0):.1f} ms"
                            + (f", {d.get('last_service')} {_ago(d.get('last_at'), now)}"
                               if d.get("last_service") else "")),
        ]
    else:
        rows = [("taint", "off (not a detector node: relies on alerts)")]
    rows.append(("verifier", f"{v.get('runs', 0)} run(s), {v.get('verified', 0)} verified, "
                             f"{v.get('refuted', 0)} refuted, last {v.get('last_ms', 0):.2f} ms"))
    svc = ", ".join(f"{x.get('name')} {x.get('proto')}/{x.get('port')}"
                    for x in s.get("services", []))
    rows.append(("services", svc or "none protected"))
    return Panel(_kv(rows), title="detector", title_align="left")


def _throttle(s: dict[str, Any]) -> Panel:
    t = s.get("throttle", {})
    if not t.get("wired"):
        flags = t.get("flags", [])
        body: RenderableType = Text("not wired into this node yet"
                                    + (f"; {len(flags)} host(s) flagged earlier" if flags
                                       else ""), style="dim")
        return Panel(body, title="throttle", title_align="left")
    table = Table("host", "working set", "queued", "", box=None, pad_edge=False,
                  show_edge=False)
    sources = sorted(t.get("sources", []), key=lambda x: (-bool(x.get("flagged")),
                                                           -int(x.get("queue", 0))))
    for src in sources[:8]:
        ws = src.get("working_set", [])
        table.add_row(Text(str(src.get("host"))), Text(", ".join(map(str, ws[:4]))
                                                        + (" …" if len(ws) > 4 else "")),
                      str(src.get("queue", 0)),
                      Text("FLAGGED", style="bold red") if src.get("flagged") else Text(""))
    flags = t.get("flags", [])
    head = Text(f"{len(t.get('sources', []))} source(s), {t.get('delayed', 0)} attempt(s) "
                f"delayed, ")
    head.append(f"{len(flags)} flagged", style="bold red" if flags else "")
    body_parts: list[RenderableType] = [head]
    if sources:
        body_parts.append(table)
    if flags:
        body_parts.append(Text("flagged: " + ", ".join(str(f.get("host")) for f in flags),
                               style="red"))
    return Panel(Group(*body_parts), title="throttle", title_align="left")


_EVENT_STYLE = {"alert.verified": "green", "alert.detected": "bold red",
                "alert.refuted": "yellow", "alert.malformed": "yellow",
                "filter.installed": "cyan", "throttle.flagged": "bold red",
                "filter.error": "red", "kernel.error": "red", "component.error": "red",
                "overlay.ban": "yellow"}


def _events(events: Sequence[dict[str, Any]]) -> Panel:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="dim", no_wrap=True, min_width=8)
    t.add_column(no_wrap=True, min_width=16)
    # The cell, not the column, is no_wrap: a no_wrap column would claim the whole line and
    # squeeze the clock out.
    t.add_column(ratio=1)
    for e in list(events)[-8:]:
        kind = str(e.get("event_type", "?"))
        ts = e.get("timestamp_s")
        clock = dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S") \
            if isinstance(ts, int | float) else "?"
        detail = " ".join(f"{k}={str(v)[:24]}" for k, v in e.items()
                          if k not in ("timestamp", "timestamp_s", "event_type", "words")
                          and v not in (None, "", [], {}))
        t.add_row(clock, Text(kind, style=_EVENT_STYLE.get(kind, "")),
                  Text(detail[:300], no_wrap=True, overflow="ellipsis"))
    if not events:
        t.add_row("", Text("no events yet", style="dim"), Text(""))
    return Panel(t, title="events", title_align="left")


def _pair(left: RenderableType, right: RenderableType, width: int) -> RenderableType:
    if width < NARROW:
        return Group(left, right)
    t = Table.grid(expand=True, padding=(0, 1))
    t.add_column(ratio=1)
    t.add_column(ratio=1)
    t.add_row(left, right)
    return t


def render(snap: Snapshot) -> RenderableType:
    footer = Text(f"q quit · refresh every {snap.interval:g} s · {snap.socket}"
                  if snap.live else str(snap.socket), style="dim")
    if snap.status is None:
        retry = f"   (retrying every {snap.interval:g} s)" if snap.live else ""
        if snap.busy:
            msg = Text("The herdwall node is there but did not give its status",
                       style="bold yellow")
            msg.append(f": {snap.error}{retry}", style="")
        else:
            msg = Text("No herdwall node is running", style="bold yellow")
            msg.append(f": nothing answers on {snap.socket}", style="")
            if snap.error:
                msg.append(f"\n({snap.error})", style="dim")
            msg.append(f"\nStart one with: herdwall node run{retry}")
        return Group(Panel(msg, title="herdwall monitor", title_align="left"), footer)
    s = snap.status
    nd = s.get("node", {})
    title = Text(f"herdwall monitor — node {str(nd.get('id'))[:16]}…  "
                 f"{dt.datetime.fromtimestamp(snap.now).strftime('%H:%M:%S')}", style="bold")
    if nd.get("state") != "running":
        return Group(title, Panel(Text(f"the node is {nd.get('state')}"), title="node"),
                     footer)
    events = snap.events or s.get("events", [])
    w = snap.width
    sw = SPARK_WIDTH if w >= 150 or w < NARROW else 16
    return Group(
        title,
        _pair(_identity(s, snap.now), _alerts(s, sw), w),
        _pair(_filters(s), _detector(s, snap.now, sw), w),
        _pair(_throttle(s), _events(events), w),
        footer,
    )
