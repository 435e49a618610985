"""``herdwall alert detect`` and ``herdwall alert verify``: the sandbox from the command line."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.text import Text

from sca.alert import MAX_MESSAGES, MAX_TOTAL_BYTES, Message
from sca.atomic_file import check_writable, write_atomic
from sca.codec import FormatError, alert_id, encode_alert
from sca.emu.image import ManifestError, ServiceImage, load_image
from sca.emu.sandbox import SandboxError
from sca.envelope import MAX_ENVELOPE_BYTES, seal

from .cli import alert, load_alert_or_envelope, print_error, read_input, stdout_console

BAD_INPUT = 2


class MessageSpecError(ValueError):
    pass


def parse_message_args(specs: tuple[str, ...], proto: str) -> tuple[Message, ...]:
    """Files to messages: for UDP each FILE is one datagram; for TCP each FILE is one whole
    connection, and FILE@N makes it the next chunk of connection N."""
    if not specs:
        raise MessageSpecError("give at least one message file")
    if len(specs) > MAX_MESSAGES:
        raise MessageSpecError(f"at most {MAX_MESSAGES} message files")
    if sum(s == "-" or s.startswith("-@") for s in specs) > 1:
        raise MessageSpecError("- (standard input) can be given once: it is read to its end")
    explicit = {int(s.rsplit("@", 1)[1]) for s in specs if _conn_of(s) is not None}
    next_conn = max(explicit, default=-1) + 1
    out: list[Message] = []
    total = 0
    for spec in specs:
        conn = _conn_of(spec)
        path = spec.rsplit("@", 1)[0] if conn is not None else spec
        if proto == "udp" and conn is not None:
            raise MessageSpecError(f"{spec}: @N names a TCP connection; this service is UDP")
        data = read_input(path, MAX_TOTAL_BYTES)
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise MessageSpecError(f"the messages exceed {MAX_TOTAL_BYTES} bytes in all")
        if proto == "tcp" and conn is None:
            conn, next_conn = next_conn, next_conn + 1
        out.append(Message(data, conn))
    # Alerts number connections 0, 1, ... in order of first use: one exploit, one encoding.
    order: dict[int, int] = {}
    return tuple(m if m.connection is None else
                 Message(m.data, order.setdefault(m.connection, len(order))) for m in out)


def _conn_of(spec: str) -> int | None:
    head, sep, tail = spec.rpartition("@")
    if sep and head and tail.isdigit() and len(tail) <= 4:
        return int(tail)
    return None


def _image(manifest: str) -> ServiceImage:
    return load_image(Path(manifest))


@alert.command("detect")
@click.argument("manifest", metavar="MANIFEST")
@click.argument("msgfiles", metavar="MSGFILE...", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the alert here (canonical CBOR).")
@click.option("--sign", is_flag=True, help="Write a signed envelope instead, with this node's key.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the node key lives (with --sign).")
def detect(manifest: str, msgfiles: tuple[str, ...], output: Path | None, sign: bool,
           state_dir: Path | None) -> None:
    """Replay messages to a service in the sandbox with taint tracking; on an exploit, write a
    verified self-certifying alert.

    MANIFEST is a service.toml (or its folder). Each MSGFILE holds the raw bytes of one message
    (- reads stdin). For a UDP service every file is one datagram, in order. For a TCP service
    every file is one whole connection, in order; write FILE@N to make a file the next chunk of
    connection N, so `req1@0 req2@0 other@1` is two chunks of one connection, then another.

    Exit status: 0 an exploit was caught (and the alert written with -o), 1 none was, 2 bad input
    or the alert could not be written.
    """
    from sca.generate import Detector
    from sca.keys import KeyFileError, NodeKey
    from sca.verify import Verifier

    if sign and output is None:
        raise click.UsageError("--sign writes a signed envelope: give -o FILE")
    console = stdout_console()
    try:
        image = _image(manifest)
        messages = parse_message_args(msgfiles, image.proto)
        detector = Detector(image)
        key = NodeKey.load(state_dir) if sign else None
        # Where the alert goes is checked before the replay, not after it.
        problem = check_writable(output) if output is not None else None
    except (ManifestError, MessageSpecError, FormatError, SandboxError, OSError,
            KeyFileError) as e:
        problem = str(e)
    if problem:
        print_error(problem)
        raise click.exceptions.Exit(BAD_INPUT)
    start = time.perf_counter()
    run = detector.inspect(messages)
    elapsed = (time.perf_counter() - start) * 1000
    console.print(Text(f"replayed {len(messages)} message(s) to {image.name}: "
                       f"{run.instructions} instructions, {run.tainted_instructions} with taint, "
                       f"{elapsed:.1f} ms; the service {run.result.outcome.value}"))
    if run.detection is None:
        console.print(Text("no exploit detected", style="green"))
        raise click.exceptions.Exit(1)
    console.print(Text(f"exploit detected: {run.detection.verification.type.value} "
                       f"({run.detection.detail})", style="bold red"))
    generated = detector.generate(messages, run.detection, Verifier([image]))
    if generated is None:
        console.print(Text("no candidate alert verified; nothing written", style="yellow"))
        raise click.exceptions.Exit(1)
    encoded = encode_alert(generated.alert)
    console.print(Text(f"alert {alert_id(generated.alert).hex()} verified locally "
                       f"({generated.verdict.detail}; {generated.tried} candidate(s) tried)"))
    if output is not None:
        blob = encoded if key is None else seal(encoded, key, time.time()).encode()
        try:
            write_atomic(output, blob)
        except OSError as e:
            print_error(f"cannot write {output}: {e.strerror or e}")
            raise click.exceptions.Exit(BAD_INPUT) from None
        console.print(Text(f"wrote {output} ({len(blob)} bytes{', signed' if sign else ''})"))


@alert.command("verify")
@click.argument("manifest", metavar="MANIFEST")
@click.argument("path", metavar="ALERT")
def verify(manifest: str, path: str) -> None:
    """Check an alert (or a signed envelope) in this host's own sandbox: the alert's offsets get
    values the sender cannot predict and the service must reach them.

    Exit status: 0 verified, 1 refuted (the reason is printed), 2 malformed input.
    """
    from sca.verify import Verifier

    console = stdout_console()
    try:
        image = _image(manifest)
        the_alert, envelope = load_alert_or_envelope(read_input(path, MAX_ENVELOPE_BYTES))
        verifier = Verifier([image])
    except (ManifestError, FormatError, SandboxError, OSError) as e:
        print_error(str(e))
        raise click.exceptions.Exit(BAD_INPUT) from None
    if envelope is not None:
        console.print(Text(f"signed by node {envelope.node_id.hex()}: signature good "
                           "(that says who sent it, not that it is true)"))
    verdict = verifier.verify(the_alert)
    ms = verdict.elapsed_s * 1000
    if verdict.verified:
        console.print(Text(f"verified: {verdict.detail} ({ms:.2f} ms)", style="bold green"))
        return
    console.print(Text(f"refuted: {verdict} ({ms:.2f} ms)", style="bold red"))
    raise click.exceptions.Exit(1)
