"""``herdwall alert trace ALERT_ID``: walk an attack packet back to where it entered.

    herdwall alert trace ALERT_ID --packet FILE [--packet FILE ...] [--at UNIX_TIME]
        --gateway HOST:PORT --gateway-key HEX [--before S] [--after S]
        [--timeout S] [--tries N] [--json] [--state-dir DIR]

- The packets are the raw IPv4 packets the detecting node kept for the alert, as this host
  received them. Until the node's store keeps them, ``--packet FILE`` (raw IP bytes, one
  packet a file) is required; without it the command says so and exits 1.
- ``--at``: when the packet arrived (default: the file's modification time, which is when a
  capture tool wrote it). Routers are asked about ``[at - before, at + after]``.
- ``--gateway`` / ``--gateway-key`` (or ``HERDWALL_TRACE_GATEWAY`` /
  ``HERDWALL_TRACE_GATEWAY_KEY``): this host's last-hop router, where it answers traceback
  queries, and its public key. Every other router is learned from the answers, each vouched
  for by the one before.
- Queries are signed with this node's key (``herdwall keygen``).

Prints, per packet, the ingress router(s) with the link the packet came in on, and the path
from ingress to the last hop (each router: id, address, whether a digest confirms it or it is
inferred from its neighbours' logs). Exit status: 0 when every packet was traced to an
ingress; 3 when some trail ended without one (a router on the path did not answer, or the
packet is older than the routers' tables); 1 on errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from node.stack.packet import PacketError
from node.traceback.config import (
    ConfigError,
    RouterRef,
    format_addr,
    parse_addr,
    parse_key,
)
from node.traceback.digest import invariant_key
from node.traceback.query import AttackGraph, trace
from node.traceback.transport import UdpAsker
from sca.codec import FormatError
from sca.keys import NodeKey

from .cli import _STATE_DIR, alert, print_error, read_input, stdout_console

MAX_PACKET = 65535
NOT_TRACED = 3


def _graph_json(g: AttackGraph) -> dict[str, Any]:
    def hop(pub: bytes) -> dict[str, Any]:
        h = g.hops[pub]
        return {"router_id": h.ref.router_id, "addr": format_addr(h.ref.addr),
                "key": pub.hex(), "logged": h.logged}

    return {
        "packet": g.packet, "atomic": g.atomic,
        "ingresses": [{"router_id": i.router_id, "router_key": i.router.hex(),
                       "addr": format_addr(g.hops[i.router].ref.addr) if i.router in g.hops
                       else None, "link": i.link, "prefix": i.prefix} for i in g.ingresses],
        "paths": [[hop(p) for p in path] for path in g.paths()],
        "unresolved": [hop(p) for p in g.unresolved],
        "queries": g.queries, "dead_ends": g.dead_ends,
        "elapsed_ms": round(g.elapsed_s * 1000, 2)}


def _render(console: Any, alert_id: str, n: int, total: int, g: AttackGraph) -> None:
    p = g.packet
    proto = {6: "tcp", 17: "udp", 1: "icmp"}.get(p["proto"], f"proto {p['proto']}")  # type: ignore[call-overload]
    console.print(Text(f"alert {alert_id[:16]}  packet {n} of {total}: {proto} {p['src']} -> "
                       f"{p['dst']}, {p['total_len']} bytes (the source may be spoofed)"))
    ingress_at = {i.router: i for i in g.ingresses}
    for i in g.ingresses:
        console.print(Text(f"ingress: router {i.router_id} via {i.link}"
                           + (f" ({i.prefix})" if i.prefix else ""), style="bold"))
    if not g.ingresses:
        console.print(Text("no ingress found", style="bold yellow"))
    for k, path in enumerate(g.paths(), 1):
        console.print(Text(f"path {k}, ingress first:" if path[0] in ingress_at
                           else f"path {k}, from where the trail ends:"))
        for j, pub in enumerate(path):
            h = g.hops[pub]
            state = {True: "logged", False: "marked", None: "no answer"}[h.logged]
            notes = []
            if pub in ingress_at and j == 0:
                i = ingress_at[pub]
                notes.append(f"ingress via {i.link}" + (f" ({i.prefix})" if i.prefix else ""))
            if pub in g.unresolved:
                notes.append("did not answer: trail ends here")
            if pub == g.gateway:
                notes.append("last hop")
            console.print(Text(f"  router {h.ref.router_id!s:>5}  {format_addr(h.ref.addr):<21}"
                               f" {state:<9} {'; '.join(notes)}".rstrip()))
    console.print(Text(f"asked {g.queries} routers in {g.elapsed_s * 1000:.1f} ms; "
                       f"{g.dead_ends} false branches dropped"))


@alert.command("trace")
@click.argument("alert_id", metavar="ALERT_ID")
@click.option("--packet", "packets", multiple=True, metavar="FILE",
              help="A raw IPv4 packet of the alert, as received here (repeat for more).")
@click.option("--at", "at", type=float, default=None,
              help="Unix time the packet arrived (default: the file's modification time).")
@click.option("--gateway", envvar="HERDWALL_TRACE_GATEWAY", default=None, metavar="HOST:PORT",
              help="This host's last-hop router's traceback address.")
@click.option("--gateway-key", envvar="HERDWALL_TRACE_GATEWAY_KEY", default=None,
              metavar="HEX", help="That router's public key (64 hex digits).")
@click.option("--before", type=click.FloatRange(0, 600), default=1.0, show_default=True,
              help="Seconds before --at to ask about (the path's latency and clock skew; "
                   "a wider window means more false positives).")
@click.option("--after", type=click.FloatRange(0, 60), default=0.5, show_default=True,
              help="Seconds after --at to ask about (clock skew).")
@click.option("--timeout", type=click.FloatRange(0.01, 10), default=0.25, show_default=True,
              help="Seconds to wait for an answer the first time (doubling on each retry).")
@click.option("--tries", type=click.IntRange(1, 8), default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_STATE_DIR
def trace_cmd(alert_id: str, packets: tuple[str, ...], at: float | None, gateway: str | None,
              gateway_key: str | None, before: float, after: float, timeout: float,
              tries: int, as_json: bool, state_dir: Path | None) -> None:
    """Trace an alert's attack packets back to the router where they entered the network."""
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", alert_id):
        raise click.BadParameter("an alert id is hex (8 to 64 digits)", param_hint="ALERT_ID")
    if not packets:
        print_error(f"no raw packets stored for alert {alert_id} (the node's packet store is "
                    "not available yet): give them with --packet FILE")
        raise click.exceptions.Exit(1)
    if gateway is None or gateway_key is None:
        raise click.UsageError("--gateway and --gateway-key (or HERDWALL_TRACE_GATEWAY and "
                               "HERDWALL_TRACE_GATEWAY_KEY) name this host's last-hop router")
    try:
        ref = RouterRef(parse_addr(gateway), parse_key(gateway_key))
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--gateway/--gateway-key") from None
    loaded = []
    for path in packets:
        data = read_input(path, MAX_PACKET)
        try:
            invariant_key(data)
        except PacketError as e:
            raise FormatError(f"{path}: not an IPv4 packet ({e})") from None
        when = at if at is not None else os.stat(path).st_mtime if path != "-" else None
        if when is None:
            raise click.UsageError("--at is needed when the packet comes from stdin")
        loaded.append((data, when))
    key = NodeKey.load(state_dir)
    asker = UdpAsker(timeout=timeout, tries=tries)

    async def run() -> list[AttackGraph]:
        return [await trace(data, at=when, key=key, gateway=ref, ask=asker, before=before,
                            after=after) for data, when in loaded]

    graphs = asyncio.run(run())
    if as_json:
        click.echo(json.dumps({"alert": alert_id, "packets": [_graph_json(g) for g in graphs]},
                              indent=2))
    else:
        console = stdout_console()
        for n, g in enumerate(graphs, 1):
            _render(console, alert_id, n, len(graphs), g)
    if not all(g.ingresses for g in graphs):
        raise click.exceptions.Exit(NOT_TRACED)
