"""``herdwall demo``: the alert path end to end, on this machine alone.

For each sample service: benign traffic is replayed with taint and raises nothing; the exploit
is caught, turned into the smallest alert that verifies, signed by a detector node; a second
node with its own key and its own sandbox receives the envelope, checks the signature and
verifies the alert independently; a benign message dressed up as an alert and a tampered
envelope are refused. The vulnerable services run only inside the emulator; no packet is sent
and no kernel state is touched. (The overlay, filters and daemon come in later versions.)
"""

from __future__ import annotations

import random
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sca.alert import Alert, ByteRef, ExecutionControl
from sca.codec import FormatError, alert_id, encode_alert
from sca.emu.image import load_image
from sca.envelope import decode_envelope, seal
from sca.generate import Detector
from sca.keys import NodeKey
from sca.services import SAMPLES, manifest_path, traffic
from sca.verify import Verifier

BENIGN_SESSIONS = 10


def run_demo(console: Console) -> int:
    """Run the demo, printing each step; 0 if every check came out as it should."""
    failures = 0

    def result(ok: bool, text: str) -> None:
        nonlocal failures
        failures += not ok
        mark = Text("  ok   " if ok else "  FAIL ", style="green" if ok else "bold red")
        console.print(mark + Text(text))

    detector_key, receiver_key = NodeKey.generate(), NodeKey.generate()
    console.print(Text("two nodes: detector ", style="bold") + Text(detector_key.node_id.hex())
                  + Text(", receiver ", style="bold") + Text(receiver_key.node_id.hex()))
    images = [load_image(manifest_path(name)) for name in SAMPLES]
    receiver = Verifier(images)  # the receiving node's own sandboxes
    summary = Table(title="containment path per sample service")
    for col in ("service", "alert type", "detect ms", "local verify ms", "receiver verify ms",
                "alert bytes"):
        summary.add_column(col)
    rng = random.Random(2026)
    for image in images:
        t = traffic(image.name)
        console.print(Text(f"\n{image.name}", style="bold cyan")
                      + Text(f" ({image.proto}/{image.port}, id {image.service_id.hex()[:16]}…)"))
        start = time.perf_counter()
        detector = Detector(image)
        boot_ms = (time.perf_counter() - start) * 1000
        clean = sum(detector.inspect(t.benign(rng)).detection is None
                    for _ in range(BENIGN_SESSIONS))
        result(clean == BENIGN_SESSIONS, f"booted a flash clone in {boot_ms:.0f} ms; "
               f"{clean}/{BENIGN_SESSIONS} benign sessions raised nothing")
        messages = tuple(t.exploit(rng))
        start = time.perf_counter()
        run = detector.inspect(messages)
        detect_ms = (time.perf_counter() - start) * 1000
        if run.detection is None:
            result(False, "the exploit was not detected")
            continue
        result(run.detection.verification.type == t.EXPECTED_TYPE,
               f"exploit caught by taint tracking: {run.detection.verification.type.value}, "
               f"{detect_ms:.1f} ms")
        generated = detector.generate(messages, run.detection, Verifier([image]))
        if generated is None:
            result(False, "no candidate alert verified at the detector")
            continue
        alert = generated.alert
        encoded = encode_alert(alert)
        result(True, f"alert {alert_id(encoded).hex()[:16]}… ({len(encoded)} bytes, "
               f"{len(alert.messages)} message(s)) verified locally: {generated.verdict.detail}")
        wire = seal(encoded, detector_key, time.time()).encode()
        envelope = decode_envelope(wire)
        received = envelope.open()
        receiver.sandbox(image.service_id)  # boot the receiver's clone outside the timing
        first = receiver.verify(received)
        verdict = receiver.verify(received)  # again, with fresh unpredictable values
        result(first.verified and verdict.verified and envelope.node_id == detector_key.node_id,
               f"receiver: signature of {envelope.node_id.hex()[:16]}… good; own sandbox says "
               f"{verdict} ({first.elapsed_s * 1000:.2f} ms first, "
               f"{verdict.elapsed_s * 1000:.2f} ms warm)")
        summary.add_row(image.name, alert.type.value, f"{detect_ms:.1f}",
                        f"{generated.verdict.elapsed_s * 1000:.2f}",
                        f"{verdict.elapsed_s * 1000:.2f}", str(len(encoded)))
        benign = max(t.benign(rng), key=lambda m: len(m.data))
        mid = len(benign.data) // 2
        dressed = Alert(image.service_id, image.name, (benign,),
                        ExecutionControl(tuple(ByteRef(0, mid + i) for i in range(3)
                                               if mid + i < len(benign.data))))
        lie = receiver.verify(dressed)
        result(not lie.verified, f"a benign message dressed up as an alert: refuted ({lie})")
        forged = bytearray(wire)
        forged[wire.index(alert.messages[0].data[:8])] ^= 0x01
        try:
            decode_envelope(bytes(forged)).open()
            result(False, "a tampered envelope was accepted")
        except FormatError as exc:
            result(True, f"one flipped bit in the envelope: refused ({exc})")
    console.print()
    console.print(summary)
    if failures:
        console.print(Text(f"demo: {failures} step(s) failed", style="bold red"))
        return 1
    console.print(Text("demo: every step passed", style="bold green"))
    return 0
