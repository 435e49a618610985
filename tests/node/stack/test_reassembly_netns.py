"""Crafted TCP segments against a real Linux receiver: the stack's reassembly must yield exactly
the bytes the server's kernel delivered to the server socket.

Server namespace: ``inet herdwall`` with port 5000 protected, the static NFQUEUE rules, the
stack inline on the queue (``StackQueue``) and a server that reads every connection to EOF.
Client namespace: a raw socket sends hand-made segments (its kernel's RSTs for the unknown
connection are dropped there). Each scenario is one connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from node.kernel.inline import StackQueue
from node.kernel.nft import NftTable
from node.kernel.queue_rules import QueueRules
from node.stack import FlowOpened, MessageIn, Stack, StackConfig
from node.stack.packet import ACK, FIN, PSH, SYN, parse_ip, parse_tcp
from node.testbed import Testbed
from node.testbed.craft import TcpConversation

pytestmark = pytest.mark.netns
PORT = 5000
A, B, C, D = b"A" * 10, b"B" * 10, b"C" * 10, b"D" * 10

# name -> list of (offset, data, extra) segments after the handshake; extra: "old_ts" (TSval far
# in the past), "bad_csum", "no_ts". The stream ends where the last in-order byte is.
SCENARIOS: dict[str, list[tuple[int, bytes, str]]] = {
    "in_order": [(0, A, ""), (10, B, ""), (20, C, "")],
    "out_of_order": [(20, C, ""), (10, B, ""), (0, A, "")],
    "retransmit_different_bytes": [(0, A, ""), (0, B, ""), (10, C, "")],
    "overlap_into_delivered": [(0, A, ""), (5, B, ""), (15, C[:5], "")],
    "held_then_lower_start_overlap": [(10, A, ""), (5, B, ""), (0, C[:5], "")],
    "held_same_start_longer_wins": [(10, A[:5], ""), (10, B, ""), (0, C, "")],
    "held_same_start_shorter_loses": [(10, A, ""), (10, B[:5], ""), (0, C, "")],
    "held_contains_later": [(10, A + A, ""), (15, B[:5], ""), (0, C, "")],
    "later_covers_held": [(15, A[:5], ""), (10, B + B, ""), (0, C, "")],
    "three_way_overlap": [(12, A, ""), (8, B, ""), (16, D, ""), (0, C[:8], "")],
    "paws_old_timestamp": [(0, A, ""), (10, B, "old_ts"), (10, C, "")],
    "bad_checksum_first": [(0, A, "bad_csum"), (0, B, ""), (10, C, "")],
    "no_timestamp_option": [(0, A, ""), (10, B, "no_ts"), (20, C, "")],
}


class Bed:
    def __init__(self) -> None:
        self.tb = Testbed(2, tag="rsm")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        self.tb.wait_ready()
        srv, cli = self.tb[0], self.tb[1]
        self.nft = NftTable(srv.name)
        self.nft.ensure()
        self.nft.protect("tcp", PORT)
        self.rules = QueueRules(netns=srv.name)
        self.rules.install()
        cli.ns.run(["iptables", "-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "RST", "RST",
                    "-j", "DROP"])
        self.listener = srv.ns.call(lambda: socket.create_server(("10.77.0.1", PORT)))
        self.received: dict[int, bytes] = {}  # client port -> bytes read by the server
        self.done: dict[int, threading.Event] = {}
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()
        self.raw = cli.ns.call(socket.socket, socket.AF_INET, socket.SOCK_RAW,
                               socket.IPPROTO_RAW)
        self.rx = cli.ns.call(socket.socket, socket.AF_INET, socket.SOCK_RAW,
                              socket.IPPROTO_TCP)
        self.rx.settimeout(2)

    def _serve(self) -> None:
        self.listener.settimeout(0.5)
        while not self._stop:
            try:
                conn, (_, cport) = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._read, args=(conn, cport), daemon=True).start()

    def _read(self, conn: socket.socket, cport: int) -> None:
        buf = bytearray()
        conn.settimeout(10)
        try:
            while d := conn.recv(65536):
                buf += d
        except OSError:
            pass
        self.received[cport] = bytes(buf)
        self.done.setdefault(cport, threading.Event()).set()
        conn.close()

    def send(self, pkt: bytes) -> None:
        self.raw.sendto(pkt, ("10.77.0.1", 0))

    def synack(self, cport: int) -> tuple[int, int]:
        """The server's ISN and TSval from its SYN/ACK."""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            data = self.rx.recv(65536)
            # Received on a veth, the server's segments may carry a partial checksum: no check.
            ip = parse_ip(data, verify=False)
            tcp = parse_tcp(ip, verify=False)
            if tcp.sport == PORT and tcp.dport == cport and tcp.flags & SYN:
                return tcp.seq, tcp.options.ts[0] if tcp.options.ts else 0
        raise AssertionError("no SYN/ACK from the server")

    def close(self) -> None:
        self._stop = True
        for s in ("raw", "rx", "listener"):
            if hasattr(self, s):
                getattr(self, s).close()
        if hasattr(self, "rules"):
            self.rules.remove()
        if hasattr(self, "nft"):
            self.nft.teardown()
        self.tb.close()


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    b = Bed()
    try:
        yield b
    finally:
        b.close()


def _corrupt(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    b[36] ^= 0xFF  # a TCP checksum byte (IPv4 header of 20 bytes)
    return bytes(b)


async def _run(bed: Bed, name: str, cport: int) -> tuple[bytes, bytes]:
    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    events: list = []
    sq = StackQueue(stack, events.extend, netns=bed.tb[0].name).start()
    try:
        conv = TcpConversation(sport=cport, dport=PORT, client_isn=0xFFFFFF00 + cport % 64)
        bed.done[cport] = threading.Event()
        bed.send(conv.syn())
        await asyncio.sleep(0)
        isn, conv.server_ts = await asyncio.to_thread(bed.synack, cport)
        conv.server_isn = isn
        conv.s_next = (isn + 1) & 0xFFFFFFFF
        bed.send(conv.ack())
        end = 0
        for off, data, extra in SCENARIOS[name]:
            ts = (1, 0) if extra == "old_ts" else None
            if extra == "no_ts":
                conv.timestamps = False
            pkt = conv.to_server(data, seq=off, ts=ts)
            conv.timestamps = True
            if extra == "bad_csum":
                pkt = _corrupt(pkt)
            bed.send(pkt)
            end = max(end, off + len(data))
            await asyncio.sleep(0.02)  # each segment is processed by both before the next
        bed.send(conv.to_server(b"", seq=end, flags=FIN | ACK))
        await asyncio.to_thread(bed.done[cport].wait, 10)
        await asyncio.sleep(0.05)
    finally:
        sq.close()
    flows = [e.flow_id for e in events if isinstance(e, FlowOpened) and e.sport == cport]
    assert len(flows) == 1, events
    got = b"".join(e.message.data for e in events
                   if isinstance(e, MessageIn) and e.flow_id == flows[0])
    return got, bed.received.get(cport, b"<nothing>")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_stack_yields_what_the_server_kernel_delivered(bed: Bed, name: str) -> None:
    cport = 41000 + list(SCENARIOS).index(name)
    got, delivered = asyncio.run(_run(bed, name, cport))
    assert delivered != b"<nothing>"
    assert got == delivered, f"{name}: stack {got!r} server {delivered!r}"


def test_flags_used() -> None:
    assert PSH and ACK  # keep the imports honest for readers of the scenarios
