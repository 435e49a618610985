"""The filter gate on the stack's queue path, driven packet by packet through ``StackQueue``'s
callback (no kernel: a fake verdict handle and clock): what it blocks, for how long, and the
state it keeps."""

from __future__ import annotations

import pytest

from filters.condition import Filter, Specific
from filters.userspace import UserspaceFilters
from node.filtering import FilterGate
from node.kernel.inline import StackQueue
from node.stack import Stack, StackConfig
from node.stack.packet import ACK, FIN, RST, SYN, TcpOptions, ip_bytes, tcp_packet

PORT = 80
EXPLOIT = Filter(b"\x01" * 32, "httpd", "tcp", PORT, Specific(0, b"EXPLOIT"))


class _Clock:
    now = 1.0

    def time(self) -> float:
        return self.now


class _Verdict:
    rewrite = None
    verdict = ""

    def accept(self, *args: object, **kwargs: object) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


class _Node:
    """A stack, its gate with the exploit filter, and ``send(packet) -> verdict``."""

    def __init__(self, f: Filter = EXPLOIT) -> None:
        self.filters = UserspaceFilters([f])
        self.stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
        self.gate = FilterGate(self.filters, stack=self.stack)
        self.clock = _Clock()
        self.queue = StackQueue(self.stack, gate=self.gate, inline_ports=self.filters,
                                loop=self.clock)  # type: ignore[arg-type]

    def send(self, packet: bytes) -> str:
        h = _Verdict()
        self.queue._on_packet(packet, h)  # type: ignore[arg-type]
        return h.verdict

    def connect(self, client: bytes, server: bytes, sport: int) -> None:
        assert self.send(tcp_packet(client, server, sport, PORT, seq=1, flags=SYN,
                                    options=TcpOptions(wscale=7))) == "accept"
        self.send(tcp_packet(server, client, PORT, sport, seq=9, ack=2, flags=SYN | ACK,
                             window=65535, options=TcpOptions(wscale=7)))
        assert self.send(tcp_packet(client, server, sport, PORT, seq=2, ack=10,
                                    flags=ACK)) == "accept"

    def opened(self, first: bytes) -> tuple[bytes, bytes]:
        """A connection from 10.77.6.6:40000 whose first bytes ``first`` passed."""
        c, s = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
        self.connect(c, s, 40000)
        assert self.send(tcp_packet(c, s, 40000, PORT, seq=2, ack=10, flags=ACK,
                                    payload=first)) == "accept"
        return c, s


@pytest.mark.parametrize("client,server", [("10.77.6.6", "10.77.0.2"), ("fd77::6", "fd77::2")])
def test_a_matched_connection_stays_dropped_retransmissions_and_all(client: str,
                                                                    server: str) -> None:
    """The stack counts a matched segment's bytes as delivered, so its resend brings no event:
    the gate must know the connection by its addresses, over IPv6 as over IPv4 (it did not)."""
    node = _Node()
    c, s = ip_bytes(client), ip_bytes(server)
    node.connect(c, s, 40000)
    seg = tcp_packet(c, s, 40000, PORT, seq=2, ack=10, flags=ACK, payload=b"EXPLOIT")
    assert [node.send(seg) for _ in range(4)] == ["drop"] * 4
    assert node.gate.hits == 1


def test_the_gates_state_goes_with_the_flow_whoever_closes_it() -> None:
    """The server closing first (its FIN, its last ACK: packets the gate does not judge) ends
    the flow: the stream the gate kept for it goes too (it stayed, for every connection)."""
    node = _Node()
    c, s = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
    for i in range(50):
        sport = 40000 + i
        node.connect(c, s, sport)
        request = b"POST / HTTP/1.0\r\n\r\n" + b"x" * 3000
        for k in range(0, len(request), 1400):
            assert node.send(tcp_packet(c, s, sport, PORT, seq=2 + k, ack=10, flags=ACK,
                                        payload=request[k:k + 1400])) == "accept"
        end = 2 + len(request)
        node.send(tcp_packet(s, c, PORT, sport, seq=10, ack=end, flags=ACK | FIN,
                             payload=b"HTTP/1.0 200 OK\r\n\r\n"))
        node.send(tcp_packet(c, s, sport, PORT, seq=end, ack=30, flags=ACK | FIN))
        node.send(tcp_packet(s, c, PORT, sport, seq=30, ack=end + 1, flags=ACK))
        # Data after the close is taken by nobody: no stream grows again.
        assert node.send(tcp_packet(c, s, sport, PORT, seq=end + 1, ack=30, flags=ACK,
                                    payload=b"B" * 1000)) == "drop"
    assert node.gate.streams == {} and node.gate.stream_bytes == 0


def test_a_block_ends_with_its_flow_and_a_new_connection_is_checked_afresh() -> None:
    """Forged segments in a victim's name put its addresses on the block list; the server's
    reset ends each such flow, and with it the block: the victim can connect later."""
    node = _Node()
    victim, s = ip_bytes("10.77.5.5"), ip_bytes("10.77.0.2")
    for sport in range(33000, 33200):
        assert node.send(tcp_packet(victim, s, sport, PORT, seq=777, ack=1, flags=ACK,
                                    payload=b"EXPLOIT")) == "drop"
        node.send(tcp_packet(s, victim, PORT, sport, seq=1, flags=RST))
    assert node.gate.hits == 200 and node.gate.blocked == {}
    node.connect(victim, s, 33100)
    # A SYN on a blocked connection that is still open changes nothing (the stack ignores
    # it): the connection's resend stays dropped until its flow ends.
    exploit = tcp_packet(victim, s, 34000, PORT, seq=777, ack=1, flags=ACK, payload=b"EXPLOIT")
    assert node.send(exploit) == "drop" and len(node.gate.blocked) == 1
    assert node.send(tcp_packet(victim, s, 34000, PORT, seq=1, flags=SYN,
                                options=TcpOptions(wscale=7))) == "drop"
    assert node.send(exploit) == "drop"
    node.send(tcp_packet(s, victim, PORT, 34000, seq=1, flags=RST))
    node.connect(victim, s, 34000)


def test_a_resend_after_its_block_is_forgotten_is_checked_where_it_lies_in_the_stream() -> None:
    """The block list is bounded: a connection it has forgotten may resend the matched bytes.
    The gate keeps the stream as it was before them, so the resend is checked at its place
    (a filter's offset counts from the stream's start), and dropped again."""
    node = _Node(Filter(b"\x01" * 32, "httpd", "tcp", PORT, Specific(4, b"EXPLOIT")))
    c, s = node.opened(b"AAAA")
    resend = tcp_packet(c, s, 40000, PORT, seq=6, ack=10, flags=ACK, payload=b"EXPLOIT")
    assert node.send(resend) == "drop"
    node.gate.blocked.clear()  # as when MAX_BLOCKED later connections have pushed it out
    assert node.send(resend) == "drop" and node.gate.hits == 2


def test_nothing_the_client_sends_ends_its_block() -> None:
    """A blocked connection's packets never reach the stack: the client's RST or FIN (which
    the service never gets) cannot close the flow here, nor a SYN start a new one, and the
    matched bytes sent again after them are still dropped, also a minute later."""
    node = _Node()
    c, s = node.opened(b"EXPL")
    tail = tcp_packet(c, s, 40000, PORT, seq=6, ack=10, flags=ACK, payload=b"OIT")
    assert node.send(tail) == "drop"
    for trick in (tcp_packet(c, s, 40000, PORT, seq=6, flags=RST),
                  tcp_packet(c, s, 40000, PORT, seq=6, ack=10, flags=ACK | FIN),
                  tcp_packet(c, s, 40000, PORT, seq=5000, flags=SYN,
                             options=TcpOptions(wscale=7))):
        assert node.send(trick) == "drop"
    node.clock.now = 62.0
    assert node.send(tail) == "drop" and node.gate.hits == 1
