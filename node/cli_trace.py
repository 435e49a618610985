"""``herdwall alert trace ALERT_ID``: walk an attack packet back to where it entered.

    herdwall alert trace ALERT_ID [--packet FILE ...] [--at UNIX_TIME] [--max-packets N]
        [--gateway HOST:PORT --gateway-key HEX] [--before S] [--after S] [--bind HOST:PORT]
        [--timeout S] [--tries N] [--json] [--config FILE] [--state-dir DIR]

- The packets are the raw IPv4 packets the detecting node kept with the alert in its store
  (``herdwall alert export ID --pcap``), as this host received them: the first
  ``--max-packets`` of them; ALERT_ID may be a prefix. ``--packet FILE`` (raw IP bytes, one
  packet a file) traces other captures instead; ALERT_ID is then only a label.
- ``--at``: when the packet arrived. Default: for stored packets the time the alert was
  recorded (after detection replayed them, hence the wider default ``--before``), for a file
  its modification time (when a capture tool wrote it). Routers are asked about
  ``[at - before, at + after]``.
- ``--gateway`` / ``--gateway-key`` (else ``HERDWALL_TRACE_GATEWAY`` /
  ``HERDWALL_TRACE_GATEWAY_KEY``, else the config's ``[traceback] gateway`` and
  ``gateway_key``): this host's last-hop router, its overlay address and node key. Every
  other router is learned from the answers, each vouched for by the one before.
- The routers are asked over the overlay, with the authenticated traceback RPC
  (``node.traceback.rpc``): the command runs an overlay client of its own on ``--bind``
  (default any address, a free port) under an overlay identity of its own derived from the
  node key (``rpc.client_key``: the node's own identity stays with the running node), and
  signs every query with this node's key (``herdwall keygen``), which is what routers check.

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
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from node.daemon.config import parse_addr as parse_bind
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
from node.traceback.rpc import OverlayAsker, client_key, query_overlay
from sca.codec import FormatError
from sca.keys import NodeKey

from .cli import alert, read_input, stdout_console
from .cli_store import CONFIG_OPTION, STATE_OPTION, View, node_config, plain_errors

MAX_PACKET = 65535
NOT_TRACED = 3
BEFORE_FILE_S = 1.0  # a capture's time is when it arrived, give or take the path's latency
BEFORE_STORED_S = 5.0  # an alert is recorded after the detector replayed its messages


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
              help="Trace this raw IPv4 packet (as received here) instead of the stored "
                   "ones (repeat for more).")
@click.option("--max-packets", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Trace at most this many of the alert's stored packets.")
@click.option("--at", "at", type=float, default=None,
              help="Unix time the packet arrived (default: when the alert was recorded, or "
                   "the file's modification time).")
@click.option("--gateway", envvar="HERDWALL_TRACE_GATEWAY", default=None, metavar="HOST:PORT",
              help="This host's last-hop router's overlay address (default: the config's "
                   "[traceback] gateway).")
@click.option("--gateway-key", envvar="HERDWALL_TRACE_GATEWAY_KEY", default=None,
              metavar="HEX", help="That router's node key (64 hex digits).")
@click.option("--before", type=click.FloatRange(0, 600), default=None,
              help=f"Seconds before --at to ask about (default {BEFORE_STORED_S:g} for stored "
                   f"packets, {BEFORE_FILE_S:g} for files; a wider window means more false "
                   "positives).")
@click.option("--after", type=click.FloatRange(0, 60), default=0.5, show_default=True,
              help="Seconds after --at to ask about (clock skew).")
@click.option("--bind", default="0.0.0.0:0", show_default=True, metavar="HOST:PORT",
              help="Where this command's overlay client listens.")
@click.option("--timeout", type=click.FloatRange(0.01, 10), default=0.05, show_default=True,
              help="Seconds to wait for an answer the first time (doubling on each retry; a "
                   "router that has not met this client answers the first retry).")
@click.option("--tries", type=click.IntRange(1, 10), default=6, show_default=True,
              help="Times a router is asked before it counts as not answering.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def trace_cmd(alert_id: str, packets: tuple[str, ...], max_packets: int, at: float | None,
              gateway: str | None, gateway_key: str | None, before: float | None,
              after: float, bind: str, timeout: float, tries: int, as_json: bool,
              config_path: Path | None, state_dir: Path | None) -> None:
    """Trace an alert's attack packets back to the router where they entered the network,
    asking the routers on the way over the overlay."""
    if not 4 <= len(alert_id) <= 64 or any(c not in "0123456789abcdefABCDEF" for c in alert_id):
        raise click.BadParameter("an alert id is hex (4 to 64 digits)", param_hint="ALERT_ID")
    cfg = node_config(config_path, state_dir)
    tb = cfg.traceback
    gateway = gateway or (format_addr(tb.gateway) if tb.gateway else None)
    gateway_key = gateway_key or tb.gateway_key or None
    if gateway is None or gateway_key is None:
        raise click.UsageError("--gateway and --gateway-key (or HERDWALL_TRACE_GATEWAY and "
                               "HERDWALL_TRACE_GATEWAY_KEY, or [traceback] gateway and "
                               "gateway_key in the config) name this host's last-hop router")
    try:
        ref = RouterRef(parse_addr(gateway), parse_key(gateway_key))
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="--gateway/--gateway-key") from None
    try:
        local = parse_bind(bind, allow_zero_port=True)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--bind") from None
    loaded = _from_files(packets, at) if packets else _from_store(cfg, alert_id, at,
                                                                 max_packets)
    if before is None:
        before = BEFORE_FILE_S if packets else BEFORE_STORED_S
    key = NodeKey.load(cfg.state_dir)

    async def run() -> list[AttackGraph]:
        overlay = query_overlay(client_key(key), local)
        await overlay.start(join=False)
        try:
            ask = OverlayAsker(overlay, timeout=timeout, tries=tries)
            return [await trace(data, at=when, key=key, gateway=ref, ask=ask, before=before,
                                after=after) for data, when in loaded]
        finally:
            await overlay.stop()

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


def _checked(data: bytes, where: str) -> bytes:
    try:
        invariant_key(data)
    except PacketError as e:
        raise FormatError(f"{where}: not an IPv4 packet ({e})") from None
    return data


def _from_files(paths: tuple[str, ...], at: float | None) -> list[tuple[bytes, float]]:
    loaded = []
    for path in paths:
        data = _checked(read_input(path, MAX_PACKET), path)
        when = at if at is not None else os.stat(path).st_mtime if path != "-" else None
        if when is None:
            raise click.UsageError("--at is needed when the packet comes from stdin")
        loaded.append((data, when))
    return loaded


def _from_store(cfg: Any, alert_id: str, at: float | None, limit: int
                ) -> list[tuple[bytes, float]]:
    """The alert's raw packets as the node's store keeps them (the running node is asked for
    the alert; the packets are read from the store file)."""
    with View(cfg) as view:
        d = view.alert(alert_id)
        stored = view.packets(d["alert_id"])
    if not stored:
        raise click.ClickException(
            f"no raw packets kept for alert {alert_id} (only alerts detected here have them):"
            " give captured ones with --packet FILE")
    when = at if at is not None else float(d["first_seen"])
    return [(_checked(p, f"alert {d['alert_id'][:16]} packet {i}"), when)
            for i, p in enumerate(stored[:limit])]
