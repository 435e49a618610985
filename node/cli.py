"""The ``herdwall`` command line.

This module defines the command groups (nouns, singular): ``alert``, ``filter``, ``node``,
``peer``, ``throttle``, ``testbed``, and the commands ``monitor``, ``demo``, ``keygen``, ``id``.

Adding commands from another module: create ``node/cli_<something>.py`` that imports a group
from here and decorates its commands, e.g.::

    from node.cli import alert

    @alert.command("verify")
    @click.argument("path")
    def verify(path: str) -> None:
        "Check an alert in this node's own sandbox."

Every ``node/cli_*.py`` module is imported when this module loads (sorted by name), so its
commands show up in ``herdwall --help`` without touching this file. A group that has no
commands yet says so and exits 1 instead of offering fake subcommands.

Errors: every exception that reaches the top becomes one red line on stderr (``error: ...``) and
exit status 1; click's usage errors exit 2. ``--debug`` (or ``HERDWALL_DEBUG=1``) lets the
traceback through instead.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from sca.codec import FormatError, decode_alert
from sca.envelope import MAX_ENVELOPE_BYTES, decode_envelope, sniff
from sca.keys import KeyFileError, NodeKey, default_state_dir

NOT_YET = "not available yet in this version"


def _version() -> str:
    try:
        return metadata.version("herdwall")
    except metadata.PackageNotFoundError:
        return "unknown"


def one_line(text: str) -> str:
    """Make ``text`` safe to print as one terminal line: no newlines, no control characters."""
    flat = " ".join(text.split())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in flat)


def describe_error(exc: BaseException) -> str:
    """What went wrong, in one human line, for exceptions that reach the top."""
    if isinstance(exc, FormatError | KeyFileError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else ""
        return f"{exc.strerror}: {name}" if name else exc.strerror
    text = str(exc) or "(no message)"
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


def print_error(message: str) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text(f"error: {one_line(message)}", style="bold red"))


def stdout_console() -> Console:
    # soft_wrap: long lines (hex ids, paths) stay whole when piped, so scripts can grep them.
    return Console(highlight=False, soft_wrap=True)


class InputFileError(OSError):
    """A file named on the command line that cannot be read: its message is one plain line
    (``str`` and ``strerror`` alike, no errno prefix)."""

    def __str__(self) -> str:
        return str(self.strerror)


def read_input(path: str, limit: int) -> bytes:
    """Read a file given on the command line (``-`` for stdin), refusing more than ``limit``
    bytes without reading them all."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:  # one plain line for the person who typed the path
        raise InputFileError(e.errno, f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise FormatError(f"{path} is larger than {limit} bytes")
    return data


class OrderedGroup(click.Group):
    """Lists commands in the order they were added (the order of the design), not sorted."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class NounGroup(OrderedGroup):
    """A command group that, called without a subcommand, shows its help, or says honestly
    that it has no commands yet (exit 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("invoke_without_command", True)
        super().__init__(*args, **kwargs)
        inner = self.callback

        # click runs the group's callback with invoked_subcommand None when no subcommand was
        # given (invoke_without_command); that is where help or "not yet" belongs.
        def callback(*cb_args: Any, **cb_kwargs: Any) -> Any:
            ctx = click.get_current_context()
            if ctx.invoked_subcommand is None:
                if not self.commands:
                    print_error(f"herdwall {self.name}: {NOT_YET}")
                    ctx.exit(1)
                click.echo(ctx.get_help())
                ctx.exit(0)
            return inner(*cb_args, **cb_kwargs) if inner is not None else None

        self.callback = callback

    def get_short_help_str(self, limit: int = 45) -> str:
        text = super().get_short_help_str(limit)
        return text if self.commands else f"{text.rstrip('.')} (no commands yet)."


class HerdwallCLI(OrderedGroup):
    """The top-level group: turns any exception into one red line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            print_error(describe_error(exc))
            ctx.exit(1)


@click.group(cls=HerdwallCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="herdwall",
                      message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, envvar="HERDWALL_DEBUG",
              help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """herdwall: cooperative worm containment for hosts."""


# --- groups (other modules add their commands to these) ------------------------------------


@main.group(cls=NounGroup)
def alert() -> None:
    """Read, check and show self-certifying alerts."""


@main.group("filter", cls=NounGroup)
def filter_() -> None:
    """Filters made from verified alerts."""


@main.group(cls=NounGroup)
def node() -> None:
    """Run and inspect this host's node."""


@main.group(cls=NounGroup)
def peer() -> None:
    """Overlay peers of this node."""


@main.group(cls=NounGroup)
def throttle() -> None:
    """The virus throttle on new connections."""


@main.group(cls=NounGroup)
def testbed() -> None:
    """Network-namespace testbeds."""


@main.command()
@click.option("--walkthrough", is_flag=True,
              help="Only the alert path per sample service (no testbed; no root needed).")
def demo(walkthrough: bool) -> None:
    """A Slammer-class worm on a 20-host testbed, without and with herdwall (about a minute,
    root); then the alert path per sample service, step by step."""
    # Imported late: the demos pull in heavy modules.
    from node.demo import run_demo
    from node.demo_worm import preflight, run_worm_demo

    console = stdout_console()
    why = None if walkthrough else preflight()
    if why is not None:
        console.print(Text(f"{why}: showing the alert walk-through only", style="yellow"))
    worm = 0 if walkthrough or why is not None else run_worm_demo(console)
    console.print()
    walk = run_demo(console)
    raise click.exceptions.Exit(worm or walk)


_STATE_DIR = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the node key lives (default: $HERDWALL_STATE_DIR, /var/lib/herdwall for root, "
         "else ~/.local/state/herdwall).")


@main.command()
@_STATE_DIR
@click.option("--force", is_flag=True, help="Replace an existing key (the node id changes).")
def keygen(state_dir: Path | None, force: bool) -> None:
    """Create this node's Ed25519 key."""
    key = NodeKey.generate()
    path = key.save(state_dir, force=force)
    console = stdout_console()
    console.print(Text(f"wrote {path} (mode 0600)"))
    console.print(Text(f"node id {key.node_id.hex()}"))


@main.command("id")
@_STATE_DIR
def id_(state_dir: Path | None) -> None:
    """Print this node's id and public key."""
    key = NodeKey.load(state_dir)
    directory = state_dir if state_dir is not None else default_state_dir()
    console = stdout_console()
    console.print(Text(f"node id     {key.node_id.hex()}"))
    console.print(Text(f"public key  {key.public_bytes.hex()}"))
    console.print(Text(f"key file    {directory / 'node.key'}"))


# --- alert commands ---------------------------------------------------------------------------


def load_alert_or_envelope(data: bytes) -> tuple[Any, Any]:
    """``(alert, envelope_or_None)`` from the bytes of an alert or of a signed envelope. An
    envelope's signature is checked (``SignatureError`` if bad) before its alert is decoded."""
    if sniff(data) == "envelope":
        envelope = decode_envelope(data)
        return envelope.open(), envelope
    return decode_alert(data), None


@alert.command("show")
@click.argument("path", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (bytes as hex).")
def alert_show(path: str, as_json: bool) -> None:
    """Show an alert or a signed envelope (FILE, or - for stdin)."""
    from node.render import alert_json, render_alert

    data = read_input(path, MAX_ENVELOPE_BYTES)
    the_alert, envelope = load_alert_or_envelope(data)
    if as_json:
        click.echo(json.dumps(alert_json(the_alert, envelope), indent=2))
    else:
        render_alert(stdout_console(), the_alert, envelope)


def _load_command_modules() -> None:
    import node

    for info in sorted(pkgutil.iter_modules(node.__path__), key=lambda m: m.name):
        if info.name.startswith("cli_"):
            importlib.import_module(f"node.{info.name}")


_load_command_modules()
