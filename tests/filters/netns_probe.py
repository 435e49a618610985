"""Run inside a test namespace (``ip netns exec NS python netns_probe.py CMD``): install filters
with libnftables and send real datagrams/segments over loopback; print one JSON line."""

from __future__ import annotations

import json
import socket
import sys
import time

from filters.condition import Filter
from filters.nft import FilterTable, NftError
from node.kernel.marks import MASK, QUEUE_STACK
from node.kernel.nft import NftTable
from node.testbed.sink import collect_streams


def _driver() -> tuple[object, object]:
    nft = NftTable()
    return nft.apply_text, nft.query_text


def _table() -> FilterTable:
    apply, query = _driver()
    return FilterTable(apply, query, queue_mark=QUEUE_STACK, mark_mask=MASK)  # type: ignore[arg-type]


def udp(filters: list[Filter], datagrams: list[bytes], port: int) -> dict[str, object]:
    subprocess_up()
    table = _table()
    table.install(filters)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", port))
    rx.settimeout(0.5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = []
    for d in datagrams:
        tx.sendto(d, ("127.0.0.1", port))
        try:
            got.append(rx.recv(65536))
        except TimeoutError:
            got.append(None)
    return {"delivered": [g is not None for g in got],
            "listed": {i.filter_id: i.packets for i in table.list()}}


def tcp(filters: list[Filter], payloads: list[bytes], port: int) -> dict[str, object]:
    subprocess_up()
    _table().install(filters)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    received: list[bytes] = []
    collect_streams(srv, received, read_timeout=1.0)
    outcome = []
    for p in payloads:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            c.sendall(p)
            time.sleep(0.2)
            c.sendall(b"")
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
            outcome.append("ok")
        except (ConnectionResetError, BrokenPipeError):
            outcome.append("reset")
        except TimeoutError:
            outcome.append("timeout")
        finally:
            c.close()
    time.sleep(0.5)
    return {"outcome": outcome, "received": [r.hex() for r in received]}


def atomic(filters: list[Filter]) -> dict[str, object]:
    subprocess_up()
    apply, query = _driver()
    table = FilterTable(apply, query, queue_mark=QUEUE_STACK, mark_mask=MASK)  # type: ignore[arg-type]
    table.install(filters[:1])
    before = query("list table inet herdwall")
    # A good element, then one for a table that does not exist: all or nothing.
    bad = ("add element inet herdwall spec_udp_584_32 { 1434 . 0x1 }\n"
           "add element inet nosuch x { 1 }\n")
    try:
        apply(bad)
        failed = False
    except NftError:
        failed = True
    after = query("list table inet herdwall")
    return {"failed": failed, "same": before == after}


def subprocess_up() -> None:
    import subprocess

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


if __name__ == "__main__":
    from filters.condition import condition_from_json

    req = json.loads(sys.stdin.read())
    fs = [Filter(bytes.fromhex(f["service_id"]), f["service"], f["proto"], f["port"],
                 condition_from_json(f["condition"])) for f in req["filters"]]
    cmd = req["cmd"]
    if cmd == "udp":
        out = udp(fs, [bytes.fromhex(d) for d in req["data"]], req["port"])
    elif cmd == "tcp":
        out = tcp(fs, [bytes.fromhex(d) for d in req["data"]], req["port"])
    else:
        out = atomic(fs)
    print(json.dumps(out))
