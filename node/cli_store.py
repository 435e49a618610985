"""Store-backed everyday commands: ``herdwall alert list|show|export`` and the bodies of
``herdwall filter list|remove`` (``node.cli_filter`` delegates to ``filter_list`` and
``filter_remove`` here).

When a node runs, they ask it over the control socket; when none does, they read the store
file directly (and, for filters, the kernel table), so they work on a stopped node too. Tables
for people by default, ``--json`` for scripts.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from node.daemon.config import Config, load_config
from node.daemon.control import ControlClient, ControlError, NoNode
from sca.atomic_file import write_atomic

from .cli import alert, print_error, stdout_console

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="HERDWALL_CONFIG", default=None,
    help="Node config (TOML); default $HERDWALL_CONFIG, else the built-in defaults.")
STATE_OPTION = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The node's state directory (overrides the config's).")


def plain_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors that already say what is wrong and what to do (a bad config or store, no node,
    the command's own) become one red line and exit 1, without the exception's type name;
    --debug still shows the traceback. Usage errors stay click's (with the usage line)."""
    from node.daemon.config import ConfigError
    from node.daemon.control import AlreadyRunning
    from node.daemon.store import StoreError

    plain = (ConfigError, StoreError, ControlError, NoNode, AlreadyRunning)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.UsageError:
            raise
        except (*plain, click.ClickException) as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            print_error(e.format_message() if isinstance(e, click.ClickException) else str(e))
            raise click.exceptions.Exit(1) from None
    return wrapper


def node_config(config_path: Path | None, state_dir: Path | None) -> Config:
    return load_config(config_path, state_dir=state_dir)


def table_console() -> Console:
    """For tables: piped output gets 160 columns instead of 80, so ids stay whole."""
    if sys.stdout.isatty():
        return stdout_console()
    return Console(highlight=False, soft_wrap=True, width=160)


def short(hex_id: str | None, n: int = 16) -> str:
    return (hex_id or "")[:n]


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class View:
    """A node's data, from the running node (control socket) or from its store file."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client: ControlClient | None = None
        self.store: Any = None
        try:
            self.client = ControlClient(cfg.socket_path).connect()
            self.client.request("ping")
        except (NoNode, ControlError):
            if self.client is not None:
                self.client.close()
            self.client = None

    @property
    def live(self) -> bool:
        return self.client is not None

    def _store(self) -> Any:
        if self.store is None:
            from node.daemon.store import Store

            self.store = Store(self.cfg.store_path, create=False, check=False)
        return self.store

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alerts(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        if self.client is not None:
            args: dict[str, Any] = {"limit": limit}
            if state:
                args["state"] = state
            return list(self.client.request("alerts", **args))
        return [r.to_json() for r in self._store().alerts(state=state, limit=limit)]

    def alert(self, alert_id: str) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.client.request("alert", id=alert_id))
        from node.daemon.node import alert_detail

        store = self._store()
        try:
            row = store.find_alert(alert_id)
        except ValueError as e:  # not hex, or ambiguous: the message says which
            raise click.ClickException(str(e)) from None
        if row is None:
            raise click.ClickException(f"no alert {alert_id} in {self.cfg.store_path}")
        return alert_detail(store, row)

    def packets(self, alert_id: str) -> list[bytes]:
        return list(self._store().packets(alert_id))


# --- alert list|show|export -------------------------------------------------------------------


@alert.command("list")
@click.option("--state", type=click.Choice(["received", "verified", "refuted", "forwarded"]),
              help="Only alerts in this state.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Show at most this many, the newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def alert_list(state: str | None, limit: int, as_json: bool, config_path: Path | None,
               state_dir: Path | None) -> None:
    """Alerts this node detected or received, newest first."""
    with View(node_config(config_path, state_dir)) as view:
        rows = view.alerts(state, limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table("alert", "service", "type", "state", "origin", "signer", "first seen", "seen",
              title=f"{len(rows)} alert(s)", title_justify="left", box=box.SIMPLE_HEAD)
    style = {"verified": "green", "forwarded": "green", "refuted": "red", "received": "yellow"}
    for r in rows:
        t.add_row(Text(short(r["alert_id"])), Text(r["service"]), Text(r["type"]),
                  Text(r["state"], style=style.get(r["state"], "")), Text(r["origin"]),
                  Text(short(r.get("signer"), 12) or "-"), when(r["first_seen"]),
                  str(r["seen_count"]))
    table_console().print(t)


_file_show = alert.commands["show"]  # cli.py's: an alert or envelope FILE


@alert.command("show")
@click.argument("what", metavar="ID|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (bytes as hex).")
@CONFIG_OPTION
@STATE_OPTION
@click.pass_context
@plain_errors
def alert_show(ctx: click.Context, what: str, as_json: bool, config_path: Path | None,
               state_dir: Path | None) -> None:
    """Show an alert: a stored one by id (or a prefix of at least 4 hex digits), or an alert or
    envelope FILE (- for stdin)."""
    if what == "-" or Path(what).exists() or not _looks_like_id(what):
        assert _file_show.callback is not None
        ctx.invoke(_file_show.callback, path=what, as_json=as_json)
        return
    from sca.codec import decode_alert
    from sca.envelope import decode_envelope

    from .render import render_alert

    with View(node_config(config_path, state_dir)) as view:
        d = view.alert(what)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    console = stdout_console()
    console.print(Text(f"alert {d['alert_id']}", style="bold"))
    console.print(Text(f"  state {d['state']} ({d['reason'] or '-'}), origin {d['origin']}"
                       f", first seen {when(d['first_seen'])}, seen {d['seen_count']} time(s)"))
    if d.get("from_peer"):
        console.print(Text(f"  from peer {d['from_peer']}"))
    for v in d.get("verifications", []):
        console.print(Text(f"  our sandbox: {'verified' if v['verified'] else 'refuted'} "
                           f"({v['reason']}{': ' + v['detail'] if v['detail'] else ''}) "
                           f"in {v['elapsed_ms']:.2f} ms at {when(v['at'])}"))
    for f in d.get("filters", []):
        console.print(Text(f"  {f['kind']} filter {f['filter_id']}: {f['state']}"))
    if d.get("packets"):
        console.print(Text(f"  {d['packets']} raw packet(s) kept (herdwall alert export "
                           f"{short(d['alert_id'])} --pcap FILE)"))
    envelope = decode_envelope(bytes.fromhex(d["envelope_hex"])) if d.get("envelope_hex") \
        else None
    the_alert = decode_alert(bytes.fromhex(d["alert_hex"]))
    if envelope is not None and d["reason"] == "bad-signature":
        envelope = None  # render_alert would refuse it; the state line says it is forged
    render_alert(console, the_alert, envelope)


def _looks_like_id(text: str) -> bool:
    return 4 <= len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def pcap(packets: list[bytes], ts: float) -> bytes:
    """A pcap file of raw IP packets (LINKTYPE_RAW), all stamped ``ts``."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)]
    sec, usec = int(ts), int((ts % 1) * 1e6)
    for p in packets:
        out.append(struct.pack("<IIII", sec, usec, len(p), len(p)) + p)
    return b"".join(out)


@alert.command("export")
@click.argument("alert_id", metavar="ID")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (default: stdout, if it is not a terminal).")
@click.option("--alert", "bare", is_flag=True,
              help="The bare alert (canonical CBOR) instead of the signed envelope.")
@click.option("--pcap", "as_pcap", is_flag=True,
              help="The raw packets that carried it (pcap, raw IP), for traceback.")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def alert_export(alert_id: str, output: Path | None, bare: bool, as_pcap: bool,
                 config_path: Path | None, state_dir: Path | None) -> None:
    """Write a stored alert's signed envelope (as received or as this node signed it), the
    bare alert, or its raw packets."""
    if bare and as_pcap:
        raise click.UsageError("--alert and --pcap exclude each other")
    with View(node_config(config_path, state_dir)) as view:
        d = view.alert(alert_id)
        if as_pcap:
            packets = view.packets(d["alert_id"])
            if not packets:
                raise click.ClickException(f"no raw packets kept for alert {alert_id} "
                                           "(only alerts detected here have them)")
            data = pcap(packets, d["first_seen"])
        elif bare or not d.get("envelope_hex") or d["reason"] == "bad-signature":
            if not bare:
                print_error("no validly signed envelope stored; writing the bare alert")
            data = bytes.fromhex(d["alert_hex"])
        else:
            data = bytes.fromhex(d["envelope_hex"])
    if output is None:
        if sys.stdout.isatty():
            raise click.UsageError("binary output: give -o FILE or redirect stdout")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        try:
            write_atomic(output, data)
        except OSError as e:
            raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
        stdout_console().print(Text(f"wrote {output} ({len(data)} bytes)"))


@alert.command("import")
@click.argument("path", metavar="FILE")
@CONFIG_OPTION
@STATE_OPTION
@plain_errors
def alert_import(path: str, config_path: Path | None, state_dir: Path | None) -> None:
    """Give the running node a signed envelope (FILE, or - for stdin), as if a peer had sent
    it: its own sandbox verifies it, and if it holds, the node installs the filters and
    publishes it. Exit 0 verified, 1 refuted or malformed, 3 no node running."""
    from sca.envelope import MAX_ENVELOPE_BYTES

    from .cli import read_input

    data = read_input(path, MAX_ENVELOPE_BYTES)
    cfg = node_config(config_path, state_dir)
    try:
        client = ControlClient(cfg.socket_path).connect()
    except NoNode as e:
        print_error(str(e))
        raise click.exceptions.Exit(3) from None
    with client:
        d = client.request("alert.import", envelope=data.hex())
    console = stdout_console()
    ok = d["state"] == "verified"
    console.print(Text(f"alert {d['alert_id'] or '(unreadable)'}: {d['state']} "
                       f"({d['reason']}){' (already known)' if d.get('duplicate') else ''}",
                       style="green" if ok else "red"))
    if not ok:
        raise click.exceptions.Exit(1)


# --- filter list|remove (registered in node.cli_filter) ---------------------------------------


def _kernel_table() -> Any:
    from node.daemon.node import kernel_filter_backend

    return kernel_filter_backend()


def filter_rows(cfg: Config, all_states: bool) -> tuple[list[dict[str, Any]], str | None]:
    """The node's filters with counters, and a note on where they came from."""
    with View(cfg) as view:
        if view.client is not None:
            return list(view.client.request("filters", all=all_states)), None
    rows: list[dict[str, Any]] = []
    note = None
    if cfg.store_path.exists():
        from node.daemon.store import Store

        with Store(cfg.store_path, create=False, check=False) as store:
            rows = [r.to_json() for r in store.filters(state=None if all_states
                                                       else "installed")]
    counters: dict[str, tuple[int, int]] | None = None
    try:
        counters = {r.filter_id: (r.packets, r.bytes) for r in _kernel_table().list()}
    except Exception as e:
        note = f"kernel counters unavailable ({e}); showing the store only"
    for r in rows:
        p, b = (counters or {}).get(r["filter_id"], (0, 0))
        r.update(packets=p, bytes=b,
                 in_kernel=None if counters is None else r["filter_id"] in counters)
    if counters:
        known = {r["filter_id"] for r in rows}
        for fid, (p, b) in counters.items():
            if fid not in known:
                rows.append({"filter_id": fid, "kind": "?", "service": "?", "proto": "?",
                             "port": 0, "state": "kernel-only", "packets": p, "bytes": b,
                             "alert_id": None, "created": None, "in_kernel": True})
    return rows, note or "no node is running: read from the store and the kernel"


@plain_errors
def filter_list(as_json: bool, all_states: bool, config_path: Path | None,
                state_dir: Path | None) -> None:
    rows, note = filter_rows(node_config(config_path, state_dir), all_states)
    if as_json:
        # "id" as well: what this command printed before the store existed.
        click.echo(json.dumps([{"id": r["filter_id"], **r} for r in rows], indent=2))
        return
    t = Table("filter", "kind", "service", "port", "state", "packets", "bytes", "alert",
              "since", title=f"{len(rows)} filter(s)", title_justify="left",
              box=box.SIMPLE_HEAD)
    for r in rows:
        state = r["state"] + ("" if r.get("in_kernel") in (None, True)
                              or r["state"] != "installed" else " (not in kernel)")
        t.add_row(Text(r["filter_id"]), Text(str(r["kind"])), Text(str(r["service"])),
                  f"{r['proto']}/{r['port']}", Text(state), str(r["packets"]),
                  str(r["bytes"]), Text(short(r.get("alert_id"), 12) or "-"),
                  when(r.get("created")))
    console = table_console()
    console.print(t)
    if note:
        console.print(Text(note, style="dim"))


@plain_errors
def filter_remove(filter_ids: tuple[str, ...], config_path: Path | None,
                  state_dir: Path | None) -> None:
    """Through the node if one runs (remembered: the filter does not come back unasked);
    else straight from the kernel, and marked removed in the store if there is one."""
    cfg = node_config(config_path, state_dir)
    console = stdout_console()
    with View(cfg) as view:
        if view.client is not None:
            try:
                out = view.client.request("filter.remove", ids=list(filter_ids))
            except ControlError as e:
                print_error(str(e))
                raise click.exceptions.Exit(1) from None
            for fid in out["missing"]:
                print_error(f"no installed filter with id {fid}")
            console.print(Text(f"removed {len(out['removed'])} filter(s)"))
            if out["missing"]:
                raise click.exceptions.Exit(1)
            return
    table = _kernel_table()
    in_kernel = {r.filter_id for r in table.list()}
    stored: set[str] = set()
    if cfg.store_path.exists():
        from node.daemon.store import Store

        with Store(cfg.store_path, create=False, check=False) as store:
            stored = {r.filter_id for r in store.filters(state="installed")}
    missing = [i for i in filter_ids if i not in in_kernel and i not in stored]
    if missing:
        print_error(f"no installed filter with id {', '.join(missing)}")
        raise click.exceptions.Exit(1)
    if stored:
        from node.daemon.store import Store

        with Store(cfg.store_path, create=False, check=False) as store:
            store.mark_filters([i for i in filter_ids if i in stored], "removed", "operator")
    table.remove([i for i in filter_ids if i in in_kernel])
    console.print(Text(f"removed {len(filter_ids)} filter(s)"))
