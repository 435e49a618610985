"""``herdwall filter generate|test|install|list|remove``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.text import Text

from sca.codec import FormatError
from sca.emu.image import ManifestError, ServiceImage, load_image
from sca.emu.sandbox import SandboxError
from sca.envelope import MAX_ENVELOPE_BYTES

from .cli import filter_, load_alert_or_envelope, print_error, read_input, stdout_console
from .cli_sca import BAD_INPUT, MessageSpecError, parse_message_args
from .kernel.marks import MASK, QUEUE_STACK


def _load(manifest: str, alert_path: str, *, verify: bool = False):  # type: ignore[no-untyped-def]
    """The service and the filters generated from ALERT, read once; with ``verify``, only for
    an alert that verifies here (else exit 1)."""
    from filters.generate import FilterGenerationError, generate_filters
    from sca.verify import Verifier

    try:
        image: ServiceImage = load_image(Path(manifest))
        alert, _ = load_alert_or_envelope(read_input(alert_path, MAX_ENVELOPE_BYTES))
        if verify:
            verdict = Verifier([image]).verify(alert)
            if not verdict.verified:
                print_error(f"not installing filters for an alert that does not verify: "
                            f"{verdict}")
                raise click.exceptions.Exit(1)
        return image, generate_filters(alert, image)
    except (ManifestError, FormatError, SandboxError, OSError, FilterGenerationError) as e:
        print_error(str(e))
        raise click.exceptions.Exit(BAD_INPUT) from None


def _filters(gen):  # type: ignore[no-untyped-def]
    return [f for f in (gen.specific, gen.general) if f is not None]


@filter_.command("generate")
@click.argument("manifest", metavar="MANIFEST")
@click.argument("alert_path", metavar="ALERT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(manifest: str, alert_path: str, as_json: bool) -> None:
    """Derive the general and the specific filter from a verified alert: the conditions in
    words, why each was kept, and the nftables text that would be installed."""
    from filters.nft import compile_filter

    _, gen = _load(manifest, alert_path)
    fs = _filters(gen)
    if as_json:
        def nft(f):  # type: ignore[no-untyped-def]
            return list(compile_filter(f, queue_mark=QUEUE_STACK, mark_mask=MASK).statements)

        click.echo(json.dumps({
            "filters": [f.to_json() | {"nft": nft(f)} for f in fs],
            "notes": gen.notes, "oracle_runs": gen.oracle_runs,
            "elapsed_ms": round(gen.elapsed_s * 1000, 1)}, indent=2))
        return
    console = stdout_console()
    for f in fs:
        c = compile_filter(f, queue_mark=QUEUE_STACK, mark_mask=MASK)
        where = "user space (marked for the queue)" if c.userspace else "nftables"
        console.print(Text(f"{f.kind} filter {f.filter_id} for {f.service_name} "
                           f"{f.proto}/{f.port}, checked in {where}", style="bold"))
        for line in f.condition.describe():
            console.print(Text(f"  - {line}"))
        for rule in c.statements:
            console.print(Text(f"  nft: {rule}", style="dim"))
    for note in gen.notes:
        console.print(Text(f"note: {note}", style="cyan"))
    console.print(Text(f"{gen.oracle_runs} sandbox replays, {gen.elapsed_s * 1000:.0f} ms"))


@filter_.command("test")
@click.argument("manifest", metavar="MANIFEST")
@click.argument("alert_path", metavar="ALERT")
@click.argument("msgfiles", metavar="MSGFILE...", nargs=-1, required=True)
def test(manifest: str, alert_path: str, msgfiles: tuple[str, ...]) -> None:
    """Say for each message (UDP: each file a datagram; TCP: each file a connection, FILE@N
    for chunks) whether the filters from ALERT would block it. Exit 0 always on good input."""
    image, gen = _load(manifest, alert_path)
    try:
        messages = parse_message_args(msgfiles, image.proto)
    except (MessageSpecError, FormatError, OSError) as e:
        print_error(str(e))
        raise click.exceptions.Exit(BAD_INPUT) from None
    streams: dict[object, bytes] = {}
    for i, m in enumerate(messages):
        key = i if m.connection is None else f"connection {m.connection}"
        streams[key] = streams.get(key, b"") + m.data
    console = stdout_console()
    for key, data in streams.items():
        hits = [f for f in _filters(gen) if f.matches(data)]
        label = f"message {key}" if isinstance(key, int) else key
        verdict = ("blocked by " + ", ".join(f"{f.kind} {f.filter_id}" for f in hits)
                   if hits else "passed")
        console.print(Text(f"{label}: {verdict}", style="red" if hits else "green"))


def _table():  # type: ignore[no-untyped-def]
    from filters.nft import FilterTable

    from .kernel.nft import NftTable

    nft = NftTable()  # where this process is: ip netns exec puts it in a namespace
    return FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)


@filter_.command("install")
@click.argument("manifest", metavar="MANIFEST")
@click.argument("alert_path", metavar="ALERT")
def install(manifest: str, alert_path: str) -> None:
    """Verify ALERT here, derive its filters and install them in table inet herdwall (root;
    in a namespace: ip netns exec NS herdwall filter install ...). One atomic batch. What
    nftables cannot check (every TCP filter) is checked by a running node's stack."""
    _, gen = _load(manifest, alert_path, verify=True)
    compiled = _table().install(_filters(gen))
    console = stdout_console()
    for c in compiled:
        where = "user space" if c.userspace else "nftables"
        console.print(Text(f"installed {c.filter.kind} filter {c.filter.filter_id} ({where})"))
    if any(c.userspace for c in compiled):
        # The kernel part only hands the port's packets to the stack's queue.
        console.print(Text("user-space filters are checked by a running node's stack "
                           "(herdwall node run with this service); without one they pass "
                           "everything", style="yellow"))


@filter_.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "all_states", is_flag=True,
              help="Also filters removed by an operator or expired (from the store).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="HERDWALL_CONFIG", default=None, help="Node config (TOML).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The node's state directory.")
def list_(as_json: bool, all_states: bool, config_path: Path | None,
          state_dir: Path | None) -> None:
    """Installed filters with their packet and byte counters: from the running node, else
    from its store and the kernel table."""
    from .cli_store import filter_list

    filter_list(as_json, all_states, config_path, state_dir)


@filter_.command("remove")
@click.argument("filter_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="HERDWALL_CONFIG", default=None, help="Node config (TOML).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The node's state directory.")
def remove(filter_ids: tuple[str, ...], config_path: Path | None,
           state_dir: Path | None) -> None:
    """Remove installed filters by id (one atomic batch). Through the running node if there is
    one, and remembered: the same filter does not come back when its alert is seen again."""
    from .cli_store import filter_remove

    filter_remove(filter_ids, config_path, state_dir)
