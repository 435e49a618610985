#!/usr/bin/env python3
"""Codec and signature rates: encode, decode, sign and signature-verify for a 1 KiB and a
16 KiB alert, plus the whole receive path (parse envelope, check signature, decode alert).

Prints a human table, then one JSON object on the last line:
``{"encode_1k_per_s": ..., "decode_1k_per_s": ..., "sign_1k_per_s": ..., ...}``.
``sign`` is the Ed25519 signature of the envelope's signed bytes; ``verify_sig`` checks it.

Usage: .venv/bin/python scripts/bench_codec.py [--seconds S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from sca.alert import Alert, ByteRef, ExecutionControl, FunctionArgument, Message
from sca.codec import decode_alert, encode_alert
from sca.envelope import open_envelope, seal, signed_message
from sca.keys import NodeKey


def alert_1k() -> Alert:
    """One 1 KiB datagram; 8 bytes of it become a return address (Slammer-like shape)."""
    payload = bytes((i * 7) & 0xFF for i in range(1024))
    return Alert(service_id=hashlib.sha256(b"bench").digest(), service_name="bench-udp",
                 messages=(Message(payload),),
                 verification=ExecutionControl(tuple(ByteRef(0, 500 + i) for i in range(8))))


def alert_16k() -> Alert:
    """16 KiB in 4 chunks of 2 connections; 64 bytes of it reach an execve argument."""
    chunk = bytes((i * 13) & 0xFF for i in range(4096))
    messages = (Message(chunk, 0), Message(chunk, 1), Message(chunk, 0), Message(chunk, 1))
    return Alert(service_id=hashlib.sha256(b"bench").digest(), service_name="bench-http",
                 messages=messages,
                 verification=FunctionArgument("execve", 1,
                                               tuple(ByteRef(2, 100 + i) for i in range(64))))


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second, from the best of three rounds of about seconds/3 each."""
    fn()
    n = 1
    while True:  # find a batch size that takes about 20 ms
        start = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - start
        if took > 0.02:
            break
        n *= 2
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            for _ in range(n):
                fn()
            count += n
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="time per measurement")
    args = parser.parse_args()
    key = NodeKey.from_private_bytes(hashlib.sha256(b"bench key").digest())
    result: dict[str, float] = {}
    table = Table(title="herdwall codec and signatures (operations per second)")
    table.add_column("alert")
    table.add_column("bytes", justify="right")
    for op in ("encode", "decode", "sign", "verify sig", "open envelope"):
        table.add_column(op, justify="right")
    for label, alert in (("1k", alert_1k()), ("16k", alert_16k())):
        data = encode_alert(alert)
        envelope = seal(data, key, time.time())
        wire = envelope.encode()
        message = signed_message(data, envelope.signed_at)
        rates = {
            "encode": rate(lambda alert=alert: encode_alert(alert), args.seconds),
            "decode": rate(lambda data=data: decode_alert(data), args.seconds),
            "sign": rate(lambda message=message: key.sign(message), args.seconds),
            "verify_sig": rate(envelope.check, args.seconds),
            "open": rate(lambda wire=wire: open_envelope(wire), args.seconds),
        }
        for op, value in rates.items():
            result[f"{op}_{label}_per_s"] = round(value, 1)
        table.add_row(label, str(len(data)), *(f"{v:,.0f}" for v in rates.values()))
    result["decode_per_s"] = result["decode_1k_per_s"]
    result["verify_sig_per_s"] = result["verify_sig_1k_per_s"]
    Console().print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
