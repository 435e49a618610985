"""``herdwall testbed up|down|status``: network-namespace testbeds that stay up between
commands (``node.testbed.registry``). Root only: namespaces need it."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich import box
from rich.table import Table
from rich.text import Text

from .cli import print_error, stdout_console, testbed


def _need_root() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        print_error("testbeds need root on Linux (network namespaces)")
        raise click.exceptions.Exit(1)


@testbed.command("up")
@click.option("--name", default="tb1", show_default=True,
              help="A short name (1-8 lowercase letters or digits) for down and status.")
@click.option("--layout", type=click.Choice(["worm", "chain"]), default="worm",
              show_default=True,
              help="worm: attacker, client, detectors, vulnerable hosts on a bridge; chain: "
                   "attacker - detector - 3 relays - vulnerable host - client, point to point.")
@click.option("--vulnerable", type=click.IntRange(1, 200), default=16, show_default=True,
              help="Vulnerable hosts (worm layout).")
@click.option("--detectors", type=click.IntRange(0, 20), default=2, show_default=True,
              help="Detector hosts (worm layout).")
@click.option("--dark/--no-dark", default=True, show_default=True,
              help="Detectors own the unused addresses of 10.77.0.0/24 (worm layout).")
@click.option("--nodes", is_flag=True, help="Start a herdwall node in each protected host.")
@click.option("--services", is_flag=True,
              help="Run the vulnerable services (emulated resolver on UDP 1434); no worm.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
def up(name: str, layout: str, vulnerable: int, detectors: int, dark: bool, nodes: bool,
       services: bool, as_json: bool) -> None:
    """Build a testbed and leave it up (namespaces named hw-…, addresses in 10.77.0.0/16,
    no route out)."""
    from node.testbed.registry import up as bring_up

    _need_root()
    try:
        rec = bring_up(name, layout=layout, vulnerable=vulnerable, detectors=detectors,
                       dark=dark, nodes=nodes, services=services)
    except ValueError as e:
        print_error(str(e))
        raise click.exceptions.Exit(2) from None
    if as_json:
        click.echo(json.dumps(rec.__dict__, indent=1))
        return
    console = stdout_console()
    console.print(Text(f"testbed {rec.name} up: {len(rec.namespaces)} namespaces, "
                       f"{len(rec.processes)} process(es); files in {rec.root}"))
    for h in rec.hosts:
        console.print(Text(f"  {h['role']:<10} {h['addr']:<24} ip netns exec {h['ns']} ..."))
    nodes = [p for p in rec.processes if p.get("socket")]
    if nodes:
        console.print(Text(f"{len(nodes)} node(s); watch one with: herdwall monitor --socket "
                           f"{nodes[0]['socket']}"))
    console.print(Text(f"remove it with: herdwall testbed down {rec.name}"))


@testbed.command("down")
@click.argument("name", required=False)
@click.option("--all", "everything", is_flag=True,
              help="Also delete every hw- namespace with no process inside, whoever made it.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def down(name: str | None, everything: bool, as_json: bool) -> None:
    """Remove testbed NAME (default: every testbed that is up) and orphaned hw- leftovers."""
    from node.testbed.registry import down as take_down

    _need_root()
    try:
        out = take_down(name, everything=everything)
    except ValueError as e:
        print_error(str(e))
        raise click.exceptions.Exit(1) from None
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    console = stdout_console()
    for t in out["testbeds"]:
        console.print(Text(f"testbed {t['name']}: {t['processes_stopped']} process(es) "
                           f"stopped, {t['namespaces_deleted']} namespace(s) deleted"))
    if out["leftovers_deleted"]:
        console.print(Text(f"leftovers deleted: {', '.join(out['leftovers_deleted'])}"))
    for k in out["leftovers_kept"]:
        why = "its maker still runs" if k["maker_alive"] else f"processes inside: {k['pids']}"
        console.print(Text(f"left alone: {k['name']} ({why})"))
    if not out["testbeds"] and not out["leftovers_deleted"]:
        console.print(Text("nothing to remove"))


@testbed.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Testbeds that are up, their processes, and other hw- namespaces on this machine."""
    from node.testbed.registry import status as get_status

    _need_root()
    st = get_status()
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    console = stdout_console()
    if not st["testbeds"]:
        console.print(Text("no testbed is up"))
    for b in st["testbeds"]:
        console.print(Text(f"testbed {b['name']} ({b['layout']}): {b['namespaces_present']}/"
                           f"{b['namespaces']} namespaces present; files in {b['root']}"))
        table = Table(box=box.SIMPLE, show_edge=False)
        for col in ("role", "address", "namespace", "process"):
            table.add_column(col)
        procs = {p.get("ns"): p for p in b["processes"]}
        for h in b["hosts"]:
            table.add_row(h["role"], h["addr"], h["ns"], _proc_text(procs.get(h["ns"])))
        console.print(table)
        for p in b["processes"]:
            if p["kind"] == "services":
                console.print(Text(f"  services (worm harness): pid {p['pid']}, "
                                   f"{'running' if p['alive'] else 'gone'}"))
    others = st["other_namespaces"]
    if others:
        console.print(Text(f"other hw- namespaces: {len(others)} "
                           f"({sum(o['orphan'] for o in others)} orphaned; "
                           "herdwall testbed down removes those)"))


def _proc_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    if not p["alive"]:
        return f"node pid {p['pid']}: gone"
    return f"node pid {p['pid']}: {'answers' if p.get('answers') else 'not answering'}"


@testbed.command("worm")
@click.option("--vulnerable", type=click.IntRange(2, 200), default=16, show_default=True,
              help="Hosts running the vulnerable service (the worm's targets).")
@click.option("--detectors", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Hosts that run the detector on the same service (with herdwall).")
@click.option("--rate", type=click.FloatRange(1, 1000), default=20.0, show_default=True,
              help="Exploit datagrams per second per infected host.")
@click.option("--with-herdwall/--without-only", default=True, show_default=True,
              help="Also run the worm against herdwall nodes, or only without them.")
@click.option("--keep", is_flag=True, help="Keep the work folder (logs, node states).")
def worm(vulnerable: int, detectors: int, rate: float, with_herdwall: bool,
         keep: bool) -> None:
    """The worm demo: a Slammer-class worm on a testbed, without and with herdwall."""
    from node.demo_worm import WormDemoConfig, run_worm_demo

    _need_root()
    cfg = WormDemoConfig(vulnerable=vulnerable, detectors=detectors, rate=rate,
                         with_herdwall=with_herdwall, keep=keep)
    raise click.exceptions.Exit(run_worm_demo(stdout_console(), cfg))
