"""``herdwall demo``: the alert path, step by step, on this machine alone.

This version shows the foundation: a node key, a fixed synthetic alert, its canonical encoding,
a signed envelope, the receiving side's checks, and a tampered copy being refused. It touches no
network and no kernel state. (The sandbox flow replaces this body once detection exists.)
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time

from rich.console import Console
from rich.text import Text

from sca.alert import Alert, ByteRef, ExecutionControl, Message
from sca.codec import FormatError, alert_id, decode_alert, encode_alert
from sca.envelope import decode_envelope, seal
from sca.keys import NodeKey


def example_alert() -> Alert:
    """A fixed, synthetic execution-control alert: one datagram whose bytes 97..104 would
    become a return address (0xdeadbeef). No real service or exploit is involved."""
    payload = b"\x04" + b"A" * 96 + (0xDEADBEEF).to_bytes(8, "little") + b"\x90" * 15
    return Alert(
        service_id=hashlib.sha256(b"herdwall demo: not a real service binary").digest(),
        service_name="demo-resolver",
        messages=(Message(payload),),
        verification=ExecutionControl(target=tuple(ByteRef(0, 97 + i) for i in range(8))),
    )


def run_demo(console: Console) -> int:
    """Run the demo, printing each step; 0 if every check came out as it should."""
    failures = 0

    def step(n: int, text: str) -> None:
        console.print(Text(f"[{n}] ", style="bold cyan") + Text(text))

    def result(ok: bool, text: str) -> None:
        nonlocal failures
        failures += not ok
        console.print(Text("    ok  " if ok else "    FAIL ", style="green" if ok else "bold red")
                      + Text(text))

    with tempfile.TemporaryDirectory(prefix="herdwall-demo-") as state_dir:
        step(1, "generate a node key (temporary state dir, removed afterwards)")
        key = NodeKey.generate()
        path = key.save(state_dir)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        reloaded = NodeKey.load(state_dir)
        result(mode == 0o600 and reloaded.public_bytes == key.public_bytes,
               f"node id {key.node_id.hex()}, key file mode {mode:04o}")

    step(2, "build a synthetic execution-control alert and encode it (canonical CBOR)")
    alert = example_alert()
    encoded = encode_alert(alert)
    result(True, f"{len(encoded)} bytes, alert id {alert_id(encoded).hex()}")

    step(3, "decode it again: same alert, same bytes")
    decoded = decode_alert(encoded)
    result(decoded == alert and encode_alert(decoded) == encoded, "round trip is exact")

    step(4, "sign it: envelope = alert + public key + time + Ed25519 signature")
    envelope = seal(encoded, key, time.time())
    wire = envelope.encode()
    result(True, f"{len(wire)} bytes on the wire")

    step(5, "receiving side: parse the envelope, check the signature, decode the alert")
    received = decode_envelope(wire)
    opened = received.open()
    result(opened == alert and received.node_id == key.node_id,
           f"signed by node {received.node_id.hex()} (says who, not that it is true)")

    step(6, "tamper with one byte of the alert inside the envelope")
    forged = bytearray(wire)
    forged[wire.index(b"AAAA")] ^= 0x01
    try:
        decode_envelope(bytes(forged)).open()
    except FormatError as exc:
        result(True, f"refused: {exc}")
    else:
        result(False, "a tampered envelope was accepted")

    step(7, "what a person sees: herdwall alert show")
    from node.render import render_alert

    render_alert(console, opened, received)
    if failures:
        console.print(Text(f"demo: {failures} step(s) failed", style="bold red"))
        return 1
    console.print(Text("demo: every step passed", style="bold green"))
    return 0
