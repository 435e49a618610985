"""Showing alerts to people (rich) and to scripts (JSON).

Everything shown comes from outside and may be hostile: data is only ever put in ``rich.Text``
objects (never parsed as markup), message bytes are shown as hex and printable ASCII, and the
service name has already been checked printable by the codec.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sca.alert import Alert, ByteRef, CodeExecution, ExecutionControl, FunctionArgument
from sca.codec import alert_id, encode_alert
from sca.envelope import Envelope, SignatureError

BYTES_PER_LINE = 16
# One style per alert type, used for the bytes the verification info points at.
_STYLE = {
    "execution-control": "bold white on red",
    "code-execution": "bold black on yellow",
    "function-argument": "bold white on magenta",
}


def _refs_by_message(alert: Alert) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for ref in alert.refs():
        out.setdefault(ref.message, set()).add(ref.offset)
    return out


def _ref_bytes(alert: Alert, refs: tuple[ByteRef, ...]) -> bytes:
    return bytes(alert.messages[r.message].data[r.offset] for r in refs)


def _ref_text(ref: ByteRef) -> str:
    return f"m{ref.message}+{ref.offset}"


def _refs_text(refs: tuple[ByteRef, ...], limit: int = 8) -> str:
    """Refs in order, runs of consecutive bytes folded: ``m0+97..104 m1+3``."""
    runs: list[list[ByteRef]] = []
    for ref in refs:
        last = runs[-1][-1] if runs else None
        if last is not None and ref.message == last.message and ref.offset == last.offset + 1:
            runs[-1].append(ref)
        else:
            runs.append([ref])
    parts = [_ref_text(run[0]) + (f"..{run[-1].offset}" if len(run) > 1 else "")
             for run in runs[:limit]]
    more = f" … ({len(runs)} runs in all)" if len(runs) > limit else ""
    return " ".join(parts) + more


def describe_info(alert: Alert) -> str:
    """One line on what the alert claims, in terms of message bytes."""
    v = alert.verification
    if isinstance(v, ExecutionControl):
        value = int.from_bytes(_ref_bytes(alert, v.target), "little")
        return (f"bytes {_refs_text(v.target)} become a control-transfer target "
                f"(little-endian value {value:#x})")
    if isinstance(v, CodeExecution):
        return f"code starting at {_ref_text(v.code)} is executed"
    assert isinstance(v, FunctionArgument)
    arg = _ref_bytes(alert, v.bytes)
    shown = repr(arg[:64])[2:-1] + ("…" if len(arg) > 64 else "")
    return f"bytes {_refs_text(v.bytes)} arrive in {v.call} argument {v.argument}: \"{shown}\""


def hexdump(data: bytes, highlight: set[int], style: str) -> Text:
    """``hexdump -C``-like lines with the offsets in ``highlight`` styled; a run of lines equal
    to the one before and with nothing highlighted is folded into one ``*``."""
    text = Text()
    previous: bytes | None = None
    folded = False
    for start in range(0, len(data), BYTES_PER_LINE):
        chunk = data[start:start + BYTES_PER_LINE]
        marked = [start + i in highlight for i in range(len(chunk))]
        if chunk == previous and not any(marked) and len(chunk) == BYTES_PER_LINE:
            if not folded:
                text.append("*\n", style="dim")
                folded = True
            continue
        previous, folded = chunk, False
        text.append(f"{start:04x}  ", style="dim")
        for i, byte in enumerate(chunk):
            text.append(f"{byte:02x}", style=style if marked[i] else "")
            text.append("  " if i == 7 else " ")
        pad = BYTES_PER_LINE - len(chunk)
        text.append("   " * pad + (" " if len(chunk) <= 8 else ""))
        text.append(" |")
        for i, byte in enumerate(chunk):
            char = chr(byte) if 0x20 <= byte < 0x7F else "."
            text.append(char, style=style if marked[i] else "")
        text.append("|\n")
    if not data:
        text.append("(empty)\n", style="dim")
    return text


def _signature_ok(envelope: Envelope) -> bool:
    try:
        envelope.check()
    except SignatureError:
        return False
    return True


def _when(ms: int) -> str:
    try:
        moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms since 1970 (out of range)"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_alert(console: Console, alert: Alert, envelope: Envelope | None = None) -> None:
    """Print ``alert`` (and who signed it, if it came in an envelope)."""
    style = _STYLE[str(alert.type)]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("alert id", Text(alert_id(alert).hex()))
    head.add_row("type", Text(str(alert.type), style=style))
    head.add_row("service", Text(alert.service_name))
    head.add_row("service id", Text(alert.service_id.hex()))
    count = len(alert.messages)
    if alert.messages[0].connection is None:
        kinds = "datagram" if count == 1 else "datagrams"
    else:
        connections = len({m.connection for m in alert.messages})
        kinds = (f"chunk{'s' if count > 1 else ''} of {connections} "
                 f"connection{'s' if connections > 1 else ''}")
    total = sum(len(m.data) for m in alert.messages)
    head.add_row("messages", Text(f"{count} {kinds}, {total} bytes"))
    head.add_row("claim", Text(describe_info(alert)))
    if envelope is not None:
        head.add_row("signed by", Text(f"node {envelope.node_id.hex()}"))
        head.add_row("public key", Text(envelope.public_key.hex()))
        head.add_row("signed at", Text(_when(envelope.signed_at)))
        if _signature_ok(envelope):
            head.add_row("signature", Text("good (says who sent it, not that it is true)",
                                           style="green"))
        else:
            head.add_row("signature", Text("BAD: does not match", style="bold red"))
    console.print(Panel(head, title="herdwall alert", title_align="left", expand=False))
    marks = _refs_by_message(alert)
    for i, message in enumerate(alert.messages):
        where = "datagram" if message.connection is None else f"connection {message.connection}"
        title = f"message {i} · {where} · {len(message.data)} bytes"
        console.print(Group(Text(title, style="bold"),
                            hexdump(message.data, marks.get(i, set()), style)))


def alert_json(alert: Alert, envelope: Envelope | None = None) -> dict[str, Any]:
    """A JSON-ready description: bytes as lowercase hex, refs as ``[message, offset]``."""
    v = alert.verification
    info: dict[str, Any]
    if isinstance(v, ExecutionControl):
        info = {"target": [[r.message, r.offset] for r in v.target]}
    elif isinstance(v, CodeExecution):
        info = {"code": [v.code.message, v.code.offset]}
    else:
        info = {"call": v.call, "arg": v.argument,
                "bytes": [[r.message, r.offset] for r in v.bytes]}
    out: dict[str, Any] = {
        "kind": "envelope" if envelope is not None else "alert",
        "alert_id": alert_id(alert).hex(),
        "version": alert.version,
        "type": str(alert.type),
        "service_id": alert.service_id.hex(),
        "service_name": alert.service_name,
        "messages": [{"connection": m.connection, "data": m.data.hex()} for m in alert.messages],
        "info": info,
        "encoded_size": len(encode_alert(alert)),
    }
    if envelope is not None:
        out["envelope"] = {
            "signer_node_id": envelope.node_id.hex(),
            "public_key": envelope.public_key.hex(),
            "signed_at_ms": envelope.signed_at,
            "signature": envelope.signature.hex(),
            "signature_ok": _signature_ok(envelope),
        }
    return out
