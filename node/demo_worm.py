"""The worm demo: a Slammer-class worm let loose on a testbed, once without herdwall and once
with it.

The testbed (``node.testbed.hosts.WormBed``, about 20 hosts on a bridge, all in network
namespaces named ``hw-…``, addresses in 10.77.0.0/16, no route out): the attacker's machine,
a benign client, two detectors that also own the empty addresses of 10.77.0.0/24 (a honeyfarm,
as Potemkin's and Vigilante's detectors are) and 16 vulnerable hosts, each running the
resolver (UDP 1434) in herdwall's emulator behind a real socket (``node.testbed.worm``). A host
whose emulated resolver is hijacked is marked infected and scans the /24 with the same
datagram at a set rate; nothing here is self-propagating code.

1. Without herdwall: the attacker scans; the vulnerable hosts fall one after another.
2. With herdwall: a node daemon (``herdwall node run``) on every detector and vulnerable host.
   The detectors replay what reaches them with taint, the others only verify alerts. The first
   exploit that lands on a detector becomes a self-certifying alert, broadcast over the overlay,
   verified by every node in its own sandbox and turned into filters in its kernel.

The summary compares the two: vulnerable hosts infected, and the time until the worm was
contained (every host not infected by then is protected by a filter). A terminal gets a live
view (the hosts, and the detector's monitor); a pipe gets plain progress lines. Everything is
removed at the end, also on failure and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from node.testbed.daemons import Fleet, NodeProc
from node.testbed.hosts import POOL, WormBed
from node.testbed.runner import HarnessProc, summarize

TICK_S = 0.25


@dataclass
class WormDemoConfig:
    vulnerable: int = 16
    detectors: int = 2
    rate: float = 20.0  # exploit datagrams per second per infected host (and the attacker)
    client_rate: float = 5.0
    without_s: float = 20.0  # the run without herdwall ends earlier once all are infected
    with_s: float = 10.0
    join_s: float = 15.0  # how long to wait for the overlay to connect the nodes
    seed: int = 1
    with_herdwall: bool = True
    keep: bool = False  # keep the work folder (logs, node states) for a look afterwards
    # Node config on top of the defaults: the throttle quarantines a host it flags.
    settings: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "throttle": {"quarantine_infected": True}})


@dataclass
class RunReport:
    mode: str  # without or with
    summary: dict[str, Any]
    detection_s: float | None = None  # first alert at a detector, after the release
    containment_s: float | None = None  # every host not infected is protected, after release
    protected: int = 0  # vulnerable hosts with a filter by the end
    alerts_verified: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Board:
    """What the view shows: updated by the runs, drawn by ``View``."""

    title: str = ""
    phase: str = ""
    started: float = 0.0
    hosts: list[str] = field(default_factory=list)
    infected: dict[str, float] = field(default_factory=dict)
    protected: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    monitor: RenderableType | None = None


class View:
    """A rich Live view on a terminal; plain lines, one per change, when piped."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.board = Board()
        self._last_line = ""

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        if not self.console.is_terminal:
            yield
            return
        with Live(self.render(), console=self.console, refresh_per_second=8,
                  transient=True, redirect_stdout=False, redirect_stderr=False) as live:
            self.live = live
            try:
                yield
            finally:
                self.live = None

    def say(self, line: str) -> None:
        """A progress line: printed as it is when piped, kept in the log panel on a tty."""
        b = self.board
        stamp = f"[{time.monotonic() - b.started:5.1f} s] " if b.started else ""
        if self.live is None:
            self.console.print(Text(stamp + line), soft_wrap=True)
        else:
            b.lines = [*b.lines, stamp + line][-8:]
            self.refresh()

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> RenderableType:
        b = self.board
        grid = Text()
        for i, h in enumerate(b.hosts):
            if h in b.infected:
                grid.append("● ", style="bold red")
            elif h in b.protected:
                grid.append("● ", style="bold green")
            else:
                grid.append("○ ", style="dim")
            grid.append(f"{h:<12}")
            if i % 4 == 3:
                grid.append("\n")
        counts = Text(f"infected {len(b.infected)}/{len(b.hosts)}   "
                      f"protected {len(b.protected)}/{len(b.hosts)}   "
                      f"{time.monotonic() - b.started:5.1f} s" if b.started else "")
        body = Group(Text(b.phase, style="bold"), grid, counts,
                     Text("\n".join(b.lines), style="dim"))
        parts: list[RenderableType] = [Panel(body, title=b.title or "herdwall worm demo",
                                             title_align="left")]
        if b.monitor is not None:
            parts.append(b.monitor)
        return Group(*parts)


# --- the runs -------------------------------------------------------------------------------


def _harness(bed: WormBed, cfg: WormDemoConfig, work: Path, tag: str, duration: float,
             until_all: bool) -> HarnessProc:
    return HarnessProc(work, bed.specs(), pool=[POOL], rate=cfg.rate, seed=cfg.seed,
                       client_rate=cfg.client_rate, stop_when_all_infected=until_all,
                       duration=duration, tag=tag)


def _follow(proc: HarnessProc, view: View, until: Callable[[], bool] | None = None,
            tick: Callable[[], None] | None = None) -> None:
    """Show the harness's infections as they come, until it ends (or ``until()``)."""
    seen = 0
    while True:
        events = proc.events()
        for e in events[seen:]:
            if e.get("event") == "released":
                view.board.started = time.monotonic()  # the clock counts from the release
                view.say(f"worm released at {', '.join(e.get('seeds', []))}")
            elif e.get("event") == "infected":
                view.board.infected[e["host"]] = e["t"]
                view.say(f"{e['host']} infected by {e['src']} "
                         f"({e['infected']}/{e['vulnerable']})")
            elif e.get("event") == "exploit":
                view.say(f"worm reached detector {e['host']} (from {e['src']})")
        seen = len(events)
        if tick is not None:
            tick()
        view.refresh()
        if not proc.alive() or (until is not None and until()):
            return
        time.sleep(TICK_S)


def run_without(bed: WormBed, cfg: WormDemoConfig, work: Path, view: View) -> RunReport:
    b = view.board
    b.title, b.infected, b.protected, b.started = "without herdwall", {}, {}, time.monotonic()
    b.phase = "no herdwall node runs anywhere"
    view.say(b.phase)
    proc = _harness(bed, cfg, work, "without", cfg.without_s, until_all=True)
    proc.start()
    try:
        _follow(proc, view)
        proc.wait(10)
    finally:
        proc.stop()
    s = summarize(proc.events())
    view.say(f"without herdwall: {s['infected']}/{s['vulnerable']} vulnerable hosts infected")
    return RunReport("without", s)


def _wait_overlay(fleet: Fleet, timeout: float, view: View) -> list[str]:
    """Until every node has an overlay peer, or ``timeout``; returns notes on what lacks."""
    comps = _components(fleet.nodes[0])
    if not any("overlay" in c for c in comps):
        note = (f"no overlay in the nodes (components running: {', '.join(comps) or 'none'}):"
                " alerts cannot travel")
        view.say(note)
        return [note]
    deadline = time.monotonic() + timeout
    lonely: list[NodeProc] = list(fleet)
    while lonely and time.monotonic() < deadline:
        lonely = [n for n in lonely if not _peers(n)]
        if lonely:
            time.sleep(0.25)
    if not lonely:
        view.say(f"overlay: all {len(fleet.nodes)} nodes have peers")
        return []
    note = (f"{len(lonely)} of {len(fleet.nodes)} nodes have no overlay peer after "
            f"{timeout:.0f} s")
    view.say(note)
    return [note]


def _status(n: NodeProc) -> dict[str, Any]:
    try:
        return n.request("status", timeout=3)  # type: ignore[no-any-return]
    except Exception:
        return {}


def _peers(n: NodeProc) -> list[Any]:
    return list(_status(n).get("peers") or [])


def _components(n: NodeProc) -> list[str]:
    return [c.get("name", "?") for c in _status(n).get("components", [])
            if c.get("state") == "running"]


def run_with(bed: WormBed, cfg: WormDemoConfig, work: Path, view: View) -> RunReport:
    b = view.board
    b.title, b.infected, b.protected, b.started = "with herdwall", {}, {}, time.monotonic()
    specs = bed.node_specs(cfg.settings)
    b.phase = f"starting {len(specs)} herdwall nodes ({cfg.detectors} detectors)"
    view.say(b.phase)
    notes: list[str] = []
    with Fleet(specs, root=work / "nodes", keep=True) as fleet:
        fleet.start()
        view.say(f"{len(specs)} nodes running")
        notes += _wait_overlay(fleet, cfg.join_s, view)
        vul_nodes = {n.spec.addr: n for n in fleet if not n.spec.detector}
        dets = [n for n in fleet if n.spec.detector]
        b.phase = f"{len(specs)} herdwall nodes running"
        proc = _harness(bed, cfg, work, "with", cfg.with_s, until_all=False)
        release_t = time.time()
        proc.start()

        def tick() -> None:
            for addr, n in vul_nodes.items():
                if addr not in b.protected:
                    rec = n.first("filter.installed", since=release_t)
                    if rec is not None:
                        b.protected[addr] = rec["timestamp_s"]
                        view.say(f"{addr} protected: {rec.get('kind', '')} filter "
                                 f"({len(b.protected)}/{len(vul_nodes)})")
            with contextlib.suppress(Exception):
                from node.monitor.render import Snapshot, render

                if dets and view.live is not None:
                    b.monitor = render(Snapshot(dets[0].socket_path, _status(dets[0]) or None,
                                                now=time.time(), interval=TICK_S))

        try:
            _follow(proc, view, tick=tick)
            proc.wait(10)
        finally:
            proc.stop()
        tick()
        events = proc.events()
        s = summarize(events)
        released = s["released_t"] or release_t
        det_recs = [r for n in dets if (r := n.first("alert.detected", since=release_t))]
        detection = min((r.get("detected_at_s", r["timestamp_s"]) for r in det_recs),
                        default=None)
        infected = {h["host"] for h in events
                    if h.get("event") == "host" and h.get("role") == "vulnerable"
                    and h.get("infected")}
        exposed = [a for a in vul_nodes if a not in infected]
        containment = None
        if exposed and all(a in b.protected for a in exposed):
            containment = max(b.protected[a] for a in exposed) - released
        verified = sum(1 for n in fleet for r in n.events()
                       if r.get("event_type") in ("alert.verified", "alert.forwarded",
                                                  "alert.detected"))
        if detection is None:
            notes.append("no detector raised an alert: "
                         + (f"components running: {', '.join(_components(dets[0])) or 'none'}"
                            if dets else "no detectors"))
    view.say(f"with herdwall: {s['infected']}/{s['vulnerable']} vulnerable hosts infected, "
             f"{len(b.protected)} protected by filters")
    return RunReport("with", s, round(detection - released, 4) if detection else None,
                     round(containment, 4) if containment is not None else None,
                     len(b.protected), verified, notes)


# --- the whole demo -------------------------------------------------------------------------


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s" if v >= 1 else f"{v * 1000:.0f} ms"


def summary_table(reports: list[RunReport]) -> Table:
    t = Table(title="Slammer-class worm on the testbed", title_justify="left")
    t.add_column("")
    for r in reports:
        t.add_column(f"{r.mode} herdwall", justify="right")

    def row(name: str, fn: Callable[[RunReport], str]) -> None:
        t.add_row(name, *[fn(r) for r in reports])

    row("vulnerable hosts infected",
        lambda r: f"{r.summary['infected']}/{r.summary['vulnerable']}")
    row("first infection", lambda r: _secs(r.summary["first_infection_s"]))
    row("last infection", lambda r: _secs(r.summary["last_infection_s"]))
    row("worm reached a detector", lambda r: _secs(r.summary["first_detector_hit_s"]))
    row("alert raised", lambda r: _secs(r.detection_s) if r.mode == "with" else "-")
    row("hosts protected by filters",
        lambda r: f"{r.protected}/{r.summary['vulnerable']}" if r.mode == "with" else "-")
    row("time to containment", lambda r: _secs(r.containment_s) if r.containment_s is not None
        else ("never: all infected" if r.summary["infected"] == r.summary["vulnerable"]
              else "not contained"))
    row("benign lookups answered",
        lambda r: f"{r.summary['benign_answered']}/{r.summary['benign_sent']}")
    return t


def preflight() -> str | None:
    """Why the worm demo cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "the worm demo needs Linux (network namespaces)"
    if os.geteuid() != 0:
        return "the worm demo needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "the worm demo needs iproute2 (the ip command)"
    return None


def run_worm_demo(console: Console, cfg: WormDemoConfig | None = None) -> int:
    """Build the testbed, run the worm without and with herdwall, print the summary, clean
    up. 0 if herdwall contained the worm (or only the run without was asked for)."""
    cfg = cfg or WormDemoConfig()
    why = preflight()
    if why:
        console.print(Text(f"error: {why}", style="bold red"))
        return 1
    work = Path(tempfile.mkdtemp(prefix="hw-demo-"))
    view = View(console)
    reports: list[RunReport] = []
    t0 = time.monotonic()
    try:
        console.print(Text(f"building the testbed: {cfg.vulnerable} vulnerable hosts, "
                           f"{cfg.detectors} detectors, an attacker and a client "
                           "(network namespaces hw-…, 10.77.0.0/16, no route out)"))
        with WormBed(cfg.vulnerable, cfg.detectors, tag="demo") as bed, view.showing():
            bed.wait_ready()
            view.board.hosts = [r.addr for r in bed.of("vulnerable")]
            reports.append(run_without(bed, cfg, work, view))
            if cfg.with_herdwall:
                reports.append(run_with(bed, cfg, work, view))
    except KeyboardInterrupt:
        console.print(Text("interrupted: the testbed was removed", style="yellow"))
        return 130
    finally:
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    console.print(summary_table(reports))
    for r in reports:
        for n in r.notes:
            console.print(Text(f"note ({r.mode} herdwall): {n}", style="yellow"))
    console.print(Text(f"done in {time.monotonic() - t0:.0f} s; testbed removed"
                       + (f"; logs in {work}" if cfg.keep else "")))
    if not cfg.with_herdwall:
        return 0
    w = reports[-1]
    return 0 if w.containment_s is not None and w.summary["infected_frac"] <= 0.25 else 1
