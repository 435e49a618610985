"""``herdwall node run|status|teardown|config``, ``herdwall peer list``,
``herdwall throttle status|clear``, ``herdwall monitor``: the daemon and what talks to it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.table import Table
from rich.text import Text

from node.daemon.config import DEFAULTS_TOML, Config, ConfigError
from node.daemon.control import ControlClient, ControlError, NoNode

from .cli import main, node, peer, print_error, stdout_console, throttle
from .cli_store import (
    CONFIG_OPTION,
    STATE_OPTION,
    node_config,
    plain_errors,
    table_console,
    when,
)

NOT_RUNNING = 3  # as LSB init scripts' "status": program is not running


def _client(cfg: Config) -> ControlClient:
    try:
        return ControlClient(cfg.socket_path).connect()
    except NoNode as e:
        print_error(str(e))
        raise click.exceptions.Exit(NOT_RUNNING) from None


def _request(cfg: Config, cmd: str, **args: Any) -> Any:
    with _client(cfg) as c:
        try:
            return c.request(cmd, **args)
        except ControlError as e:
            print_error(str(e))
            raise click.exceptions.Exit(1) from None


# --- node -------------------------------------------------------------------------------------


@node.command("run")
@CONFIG_OPTION
@STATE_OPTION
@click.option("-v", "--verbose", is_flag=True, help="Print every event as a line on stdout.")
@plain_errors
def node_run(config_path: Path | None, state_dir: Path | None, verbose: bool) -> None:
    """Run this host's node in the foreground until SIGTERM or Ctrl-C. Works with no config
    (state in the default state directory, node key made on first run, no service protected);
    filters stay in the kernel when it stops."""
    import asyncio
    import logging

    from node.daemon import realtime
    from node.daemon.node import Node

    cfg = node_config(config_path, state_dir)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="herdwall: %(name)s: %(message)s")
    # This thread runs the node's event loop (Node itself leaves scheduling alone: a test or
    # a tool that embeds one keeps its own).
    why = realtime.enter(cfg.verifier.realtime_priority)
    if why is not None:
        print_error(f"real-time scheduling unavailable ({why}): the node runs at normal "
                    "priority ([verifier] realtime_priority = 0 silences this)")
    n = Node(cfg)
    console = stdout_console()
    if verbose:
        n.bus.subscribe(lambda rec: print(json.dumps(rec, default=str), flush=True))

    def started(rec: dict[str, Any]) -> None:
        if rec.get("event_type") == "node.started":
            services = ", ".join(rec.get("services") or []) or "none"
            console.print(Text(f"herdwall node {rec['node_id']} running (pid {rec['pid']}); "
                               f"control socket {cfg.socket_path}; services protected: "
                               f"{services}; detector {'on' if cfg.detector.enabled else 'off'}"))
            if not n.kernel.get("ok") and cfg.kernel.enabled:
                print_error(f"kernel filters unavailable: {n.kernel.get('error')}")
            sys.stdout.flush()
        elif rec.get("event_type") == "node.stopped":
            console.print(Text("herdwall node stopped; filters left in place"))
            sys.stdout.flush()

    n.bus.subscribe(started)
    asyncio.run(n.run())


def _status_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    nd = s["node"]
    rows = [("node id", nd["id"]), ("state", f"{nd['state']}, pid {nd['pid']}, up "
                                    f"{nd['uptime_s']:.0f} s, herdwall {nd['version']}"),
            ("state dir", nd["state_dir"]), ("config", nd["config"] or "(built-in defaults)"),
            ("control socket", nd["socket"]), ("event log", nd["event_log"] or "off"),
            ("metrics", nd["metrics"] or "off"),
            ("scheduling", f"real-time (SCHED_FIFO {nd['realtime_priority']}) for the alert path"
             if nd.get("realtime_priority") else "normal")]
    k = s["kernel"]
    rows.append(("kernel", "off" if not k["enabled"] else
                 "ok" if k["ok"] else f"unavailable: {k['error']}"))
    if "alerts" in s:
        a = s["alerts"]
        rows.append(("alerts", f"{a['total']} ({a['detected']} detected here; "
                     f"{a['verified']} verified, {a['forwarded']} forwarded, "
                     f"{a['refuted']} refuted, {a['received']} unverifiable)"))
        f = s["filters"]
        rows.append(("filters", f"{f['installed']} installed ({f['userspace']} checked in "
                     f"user space), {f['kernel_errors']} kernel error(s)"))
        svc = ", ".join(f"{x['name']} {x['proto']}/{x['port']}" for x in s["services"])
        rows.append(("services", svc or "none protected"))
        d = s["detector"]
        rows.append(("detector", "off" if not d["enabled"] else
                     f"on: {d['queue']}/{d['capacity']} queued, {d['analysed']} replayed, "
                     f"{d['sampled_out']} sampled out, {d['detections']} detection(s)"))
        v = s["verifier"]
        rows.append(("verifier", f"{v['runs']} run(s): {v['verified']} verified, "
                     f"{v['refuted']} refuted, last {v['last_ms']:.2f} ms"))
        rows.append(("peers", f"{len(s['peers'])}; bootstrap "
                     f"{', '.join(nd['bootstrap']) or 'none'}; bind {nd['overlay_bind']}"))
        t = s["throttle"]
        rows.append(("throttle", "not wired into this node yet" if not t["wired"] else
                     f"{len(t.get('sources', []))} source(s), {t.get('delayed', 0)} delayed, "
                     f"{len(t['flags'])} flagged"))
    comps = ", ".join(f"{c['name']} ({c['state']})" for c in s.get("components", []))
    rows.append(("components", comps or "none wired yet"))
    return rows


@node.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the node's whole status as JSON.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def node_status(as_json: bool, config_path: Path | None, state_dir: Path | None) -> None:
    """Is a node running here, and what is it doing. Exit 3 if none runs."""
    cfg = node_config(config_path, state_dir)
    try:
        with ControlClient(cfg.socket_path) as c:
            s = c.request("status")
    except NoNode as e:
        if as_json:
            click.echo(json.dumps({"running": False, "socket": str(cfg.socket_path),
                                   "reason": str(e)}))
        else:
            stdout_console().print(Text(f"herdwall node: not running (nothing answers on "
                                        f"{cfg.socket_path})"))
        raise click.exceptions.Exit(NOT_RUNNING) from None
    if as_json:
        click.echo(json.dumps({"running": True, **s}, indent=2, default=str))
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in _status_lines(s):
        t.add_row(k, Text(str(v)))
    table_console().print(t)


@node.command("teardown")
@click.option("--force", is_flag=True, help="Even while a node runs (it keeps running, "
              "unprotected, until restarted).")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def node_teardown(force: bool, config_path: Path | None, state_dir: Path | None) -> None:
    """Remove everything herdwall installed in the kernel: table inet herdwall (filters, the
    stack's and the throttle's rules) and the static NFQUEUE rules. The store keeps the
    filters: the next `herdwall node run` installs them again."""
    from node.daemon.control import node_running
    from node.daemon.node import teardown

    cfg = node_config(config_path, state_dir)
    if node_running(cfg.socket_path) and not force:
        print_error(f"a node is running (control socket {cfg.socket_path}); stop it first, "
                    "or use --force")
        raise click.exceptions.Exit(1)
    out = teardown()
    console = stdout_console()
    console.print(Text("removed table inet herdwall" if out["table_removed"]
                       else "no table inet herdwall to remove"))
    console.print(Text(f"removed {out['queue_rules_removed']} NFQUEUE rule(s)"))


@node.command("config")
@click.option("--check", is_flag=True, help="Only validate; print nothing but errors.")
@click.option("--defaults", is_flag=True, help="Print the built-in defaults, with comments.")
@CONFIG_OPTION
@STATE_OPTION
def node_config_cmd(check: bool, defaults: bool, config_path: Path | None,
                    state_dir: Path | None) -> None:
    """Validate a config (its service manifests loaded, as the node would) and print the
    effective settings (JSON)."""
    from node.daemon.node import load_images

    if defaults:
        click.echo(DEFAULTS_TOML, nl=False)
        return
    try:
        cfg = node_config(config_path, state_dir)
        load_images(cfg)
    except ConfigError as e:
        print_error(str(e))
        raise click.exceptions.Exit(2) from None
    if not check:
        click.echo(json.dumps(cfg.to_json(), indent=2))


# --- peer -------------------------------------------------------------------------------------


@peer.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def peer_list(as_json: bool, config_path: Path | None, state_dir: Path | None) -> None:
    """The node's overlay peers (live from the running node, else last seen, from its store)."""
    cfg = node_config(config_path, state_dir)
    try:
        with ControlClient(cfg.socket_path) as c:
            rows = c.request("peers")
        note = None
    except NoNode:
        from node.daemon.store import Store

        if not cfg.store_path.exists():
            print_error(f"no node is running and no store at {cfg.store_path}")
            raise click.exceptions.Exit(NOT_RUNNING) from None
        with Store(cfg.store_path, create=False, check=False) as store:
            rows = [{**p, "live": False} for p in store.peers()]
        note = "no node is running: peers last seen, from the store"
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table("node id", "address", "last seen", title=f"{len(rows)} peer(s)",
              title_justify="left", box=box.SIMPLE_HEAD)
    for p in rows:
        host = f"[{p['host']}]" if ":" in p["host"] else p["host"]
        t.add_row(Text(p["node_id"]), Text(f"{host}:{p['port']}"),
                  "now" if p.get("live") else when(p.get("last_seen")))
    console = table_console()
    console.print(t)
    if note:
        console.print(Text(note, style="dim"))


# --- throttle ---------------------------------------------------------------------------------


def _throttle_state(cfg: Config) -> dict[str, Any]:
    st = _request(cfg, "throttle")
    if not st.get("wired"):
        print_error("the throttle is off in this node's config (throttle.enabled = false)"
                    if not st.get("enabled") else
                    "the throttle is not running in this node (not wired, or it failed to "
                    "start: see herdwall node status)")
        raise click.exceptions.Exit(1)
    return dict(st)


@throttle.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def throttle_status(as_json: bool, config_path: Path | None, state_dir: Path | None) -> None:
    """Working sets, delay queues and flagged hosts of the running node's throttle."""
    st = _throttle_state(node_config(config_path, state_dir))
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    t = Table("host", "working set", "queued", "flagged", title="throttle",
              title_justify="left", box=box.SIMPLE_HEAD)
    for s in st.get("sources", []):
        ws = s.get("working_set", [])
        t.add_row(Text(str(s.get("host"))), Text(", ".join(map(str, ws[:5]))
                                                  + (" …" if len(ws) > 5 else "")),
                  str(s.get("queue", 0)), Text("yes" if s.get("flagged") else "",
                                               style="bold red"))
    console = table_console()
    console.print(t)
    flags = st.get("flags", [])
    console.print(Text(f"{len(flags)} host(s) flagged infected"
                       + (": " + ", ".join(f["host"] for f in flags) if flags else "")))


@throttle.command("clear")
@click.argument("host")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def throttle_clear(host: str, config_path: Path | None, state_dir: Path | None) -> None:
    """Let a flagged HOST make new connections again."""
    out = _request(node_config(config_path, state_dir), "throttle.clear", host=host)
    stdout_console().print(Text(f"cleared {out['cleared']}"))


# --- monitor ----------------------------------------------------------------------------------


@main.command("monitor")
@CONFIG_OPTION
@STATE_OPTION
@click.option("--socket", "socket_path", type=click.Path(dir_okay=True, path_type=Path),
              default=None, help="The node's control socket (default: from the config).")
@click.option("--interval", type=click.FloatRange(0.1, 1.0), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (scripts, no terminal).")
@plain_errors
def monitor(config_path: Path | None, state_dir: Path | None, socket_path: Path | None,
            interval: float, once: bool) -> None:
    """Live view of the running node: peers, alerts, filters, throttle, detector. q or Ctrl-C
    quits."""
    from rich.console import Console

    from node.monitor.app import run_monitor

    cfg = node_config(config_path, state_dir)
    # Not stdout_console(): soft wrapping would let long cells push panels out of line.
    raise click.exceptions.Exit(run_monitor(socket_path or cfg.socket_path, interval=interval,
                                            once=once, console=Console(highlight=False)))



def _monitor_after_groups() -> None:
    # ``herdwall --help`` lists commands in the design's order (groups, then monitor, demo,
    # keygen, id); a command added from this module would otherwise come last.
    items = list(main.commands.items())
    cmds = [kv for kv in items if kv[0] != "monitor"]
    at = max(i for i, (_, c) in enumerate(cmds) if isinstance(c, click.Group)) + 1
    cmds.insert(at, ("monitor", main.commands["monitor"]))
    main.commands.clear()
    main.commands.update(cmds)


_monitor_after_groups()
