"""The kernel path in namespaces, no mocks: inet herdwall + static NFQUEUE rules + QueueAdapter on
an asyncio loop, real TCP and UDP between two namespaces through the stack, fail-open and
fail-closed without a reader, atomic batch failure, the PASS mark, teardown."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from node.kernel.inline import StackQueue
from node.kernel.marks import PASS, Q_STACK, QUEUE_STACK
from node.kernel.nfqueue import Handle, QueueAdapter
from node.kernel.nft import NftError, NftTable
from node.kernel.queue_rules import QueueRules
from node.kernel.sockets import mark_socket, socket_mark
from node.stack import FlowClosed, FlowEstablished, FlowOpened, MessageIn, Stack, StackConfig
from node.testbed import Testbed

pytestmark = pytest.mark.netns
SERVER = "10.77.0.1"


@pytest.fixture
def bed(testbed: Testbed) -> Testbed:
    return testbed  # the shared fixture in tests/conftest.py


def _kernel(tb: Testbed, *, fail_open: bool = True) -> tuple[NftTable, QueueRules]:
    nft = NftTable(tb[0].name)
    nft.ensure()
    rules = QueueRules(netns=tb[0].name, fail_open=fail_open)
    rules.install()
    return nft, rules


def _tcp_roundtrip(tb: Testbed, port: int, data: bytes, timeout: float = 5) -> bytes:
    """Client in host 1 sends ``data`` to a server in host 0 that echoes it back."""
    ls = tb[0].ns.call(socket.create_server, (SERVER, port))

    def serve() -> None:
        ls.settimeout(timeout)
        try:
            conn, _ = ls.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            buf = b""
            while len(buf) < len(data) and (d := conn.recv(65536)):
                buf += d
            conn.sendall(buf)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        c = tb[1].ns.call(socket.create_connection, (SERVER, port), timeout)
        with c:
            c.sendall(data)
            out = b""
            while len(out) < len(data) and (d := c.recv(65536)):
                out += d
        return out
    finally:
        t.join(timeout)
        ls.close()


def _udp_exchange(tb: Testbed, port: int, datagrams: list[bytes],
                  timeout: float = 2) -> list[bytes]:
    srv = tb[0].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    cli = tb[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((SERVER, port))
        srv.settimeout(timeout)
        got = []
        for d in datagrams:
            cli.sendto(d, (SERVER, port))
            try:
                got.append(srv.recv(65536))
            except TimeoutError:
                break
        return got


def _udp_reply(tb: Testbed, port: int, reply: bytes, timeout: float = 2) -> bytes:
    """A short request from host 1 to a service on ``port`` in host 0, answered with ``reply``
    (queued on its way out as the service's reply); what the client got."""
    srv = tb[0].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    cli = tb[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((SERVER, port))
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        cli.sendto(b"ask", (SERVER, port))
        _, peer = srv.recvfrom(100)
        srv.sendto(reply, peer)
        return cli.recv(65536)


def test_full_path_tcp_and_udp_through_the_stack(bed: Testbed) -> None:
    nft, rules = _kernel(bed)
    nft.protect("tcp", 5000)
    nft.protect("udp", 5353)
    stack = Stack(StackConfig(protected_tcp={5000}, protected_udp={5353},
                              verify_checksums=False))
    events: list = []
    data = bytes(range(256)) * 800  # ~200 KB: many segments, windows move

    async def main() -> tuple[bytes, list[bytes]]:
        async with StackQueue(stack, events.extend, netns=bed[0].name) as sq:
            echoed = await asyncio.to_thread(_tcp_roundtrip, bed, 5000, data)
            dgrams = await asyncio.to_thread(_udp_exchange, bed, 5353, [b"one", b"two!"])
            # The closing segments may still be on their way through the queue: wait for them.
            for _ in range(100):
                if any(type(e) is FlowClosed for e in events):
                    break
                await asyncio.sleep(0.02)
            assert sq.queue.received > 0 and sq.queue.errors == 0
        return echoed, dgrams

    try:
        echoed, dgrams = asyncio.run(main())
        assert echoed == data
        assert dgrams == [b"one", b"two!"]
        tcp_msgs = [e for e in events if isinstance(e, MessageIn) and e.proto == 6]
        assert b"".join(m.message.data for m in tcp_msgs) == data
        assert {m.message.connection for m in tcp_msgs} == {tcp_msgs[0].flow_id}
        udp_msgs = [e.message for e in events if isinstance(e, MessageIn) and e.proto == 17]
        assert [(m.data, m.connection) for m in udp_msgs] == [(b"one", None), (b"two!", None)]
        kinds = {type(e) for e in events}
        assert {FlowOpened, FlowEstablished, FlowClosed} <= kinds
        # Both directions were tracked: the server's side has its window scale and timestamps.
        flow = next(f for f in stack.flows() if f.proto == 6)
        assert flow.halves[1].shift is not None and flow.timestamps and flow.sack_permitted
        assert nft.counters()["stack_queued"][0] > 0
    finally:
        rules.remove()
        nft.teardown()


def test_fail_open_without_a_reader_traffic_passes(bed: Testbed) -> None:
    nft, rules = _kernel(bed, fail_open=True)
    nft.protect("tcp", 5001)
    try:
        assert _tcp_roundtrip(bed, 5001, b"hello") == b"hello"
        assert nft.counters()["stack_queued"][0] > 0  # it was marked for the queue
    finally:
        rules.remove()
        nft.teardown()


def test_fail_closed_without_a_reader_traffic_is_dropped(bed: Testbed) -> None:
    nft, rules = _kernel(bed, fail_open=False)
    nft.protect("tcp", 5002)
    try:
        with pytest.raises(OSError):
            _tcp_roundtrip(bed, 5002, b"hello", timeout=1)
    finally:
        rules.remove()
        nft.teardown()


def test_retained_packet_gets_its_verdict_later_with_a_mark(bed: Testbed) -> None:
    nft, rules = _kernel(bed)
    nft.protect("udp", 5003)
    seen: list[tuple[int, int]] = []

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()

        def on_packet(payload: bytes, h: Handle) -> None:
            seen.append((h.mark & 0xF0000, len(payload)))
            loop.call_later(0.05, h.accept, PASS)  # held, verdict later

        async with QueueAdapter(Q_STACK, on_packet, netns=bed[0].name) as q:
            got = await asyncio.to_thread(_udp_exchange, bed, 5003, [b"later"])
            assert q.held == 0 and q.verdicts == 1
        return got

    try:
        assert asyncio.run(main()) == [b"later"]
        assert seen == [(QUEUE_STACK, 20 + 8 + 5)]
    finally:
        rules.remove()
        nft.teardown()


@pytest.mark.parametrize("drop_on_error", [False, True])
def test_callback_errors_fall_back_to_the_default_verdict(bed: Testbed,
                                                          drop_on_error: bool) -> None:
    """A callback that raises: its packet gets the default verdict (fail-open: it passes),
    or with ``drop_on_error`` (a queue that checks what it passes) it is dropped."""
    nft, rules = _kernel(bed)
    nft.protect("udp", 5004)

    def broken(payload: bytes, h: Handle) -> None:
        raise ValueError("bug")

    async def main() -> tuple[list[bytes], int]:
        async with QueueAdapter(Q_STACK, broken, netns=bed[0].name,
                                drop_on_error=drop_on_error) as q:
            got = await asyncio.to_thread(_udp_exchange, bed, 5004, [b"x", b"y"])
            return got, q.errors

    try:
        got, errors = asyncio.run(main())
        # The exchange stops at the first datagram that does not arrive.
        assert got == ([] if drop_on_error else [b"x", b"y"])
        assert errors == (1 if drop_on_error else 2)
    finally:
        rules.remove()
        nft.teardown()


def test_own_sockets_with_the_pass_mark_are_not_queued(bed: Testbed) -> None:
    nft, rules = _kernel(bed, fail_open=False)  # anything queued without a reader is lost
    nft.protect("udp", 5005)
    try:
        srv = bed[0].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        cli = bed[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        with srv, cli:
            srv.bind((SERVER, 5005))
            mark_socket(srv)
            assert socket_mark(srv) == PASS
            # The server's own outgoing datagram passes output (PASS) though its port is protected.
            cli.bind(("10.77.0.2", 6000))
            cli.settimeout(1)
            srv.sendto(b"from the node", ("10.77.0.2", 6000))
            assert cli.recv(100) == b"from the node"
            # The reply on that connection passes too (conntrack mark restored at prerouting).
            srv.settimeout(1)
            cli.sendto(b"reply", (SERVER, 5005))
            assert srv.recv(100) == b"reply"
            # Anything else to the protected port is queued and, with no reader and no
            # --queue-bypass, lost.
            other = bed[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            with other:
                other.sendto(b"to the service", (SERVER, 5005))
                srv.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    srv.recv(100)
        assert nft.counters()["pass"][0] >= 1
    finally:
        rules.remove()
        nft.teardown()


def test_failed_batch_leaves_the_ruleset_as_it_was(bed: Testbed) -> None:
    nft = NftTable(bed[0].name)
    nft.ensure()
    try:
        nft.protect("tcp", 80)
        before = bed[0].ns.run(["nft", "-j", "list", "ruleset"]).stdout
        bad = {"add": {"rule": {"family": "inet", "table": "herdwall", "chain": "no-such-chain",
                                "expr": [{"accept": None}]}}}
        with pytest.raises(NftError, match="No such file or directory"):
            nft.apply([nft.element_cmd("add", "stack_ports", [("tcp", 81)]),
                       nft.element_cmd("delete", "stack_ports", [("tcp", 80)]), bad])
        assert bed[0].ns.run(["nft", "-j", "list", "ruleset"]).stdout == before
        assert nft.protected() == [("tcp", 80)]
        assert nft.ensure() is False  # idempotent
    finally:
        nft.teardown()


def test_teardown_leaves_nothing(bed: Testbed) -> None:
    nft, rules = _kernel(bed)
    assert rules.install() == 0  # idempotent
    assert len(rules.present()) == 12
    assert rules.remove() == 12
    assert rules.present() == []
    assert nft.teardown() is True and nft.teardown() is False
    assert "herdwall" not in bed[0].ns.run(["nft", "list", "tables"]).stdout
    for tool in ("iptables", "ip6tables"):
        assert "NFQUEUE" not in bed[0].ns.run([tool, "-t", "mangle", "-S"]).stdout


def test_an_urgent_byte_reaches_the_service_inline_as_the_stack_saw_it(bed: Testbed) -> None:
    """A client's urgent byte inside a request: a service that does not read urgent data
    inline (the default) would take it out of the stream the stack (and the gate, and the
    detector's replay) saw. Through the stack's queue the segment goes on not urgent: the
    service gets exactly the bytes the stack delivered, and its kernel accepts the rewritten
    segment."""
    import time

    nft, rules = _kernel(bed)
    nft.protect("tcp", 5006)
    stack = Stack(StackConfig(protected_tcp={5006}, verify_checksums=False))
    events: list = []
    got: list[bytes] = []
    ls = bed[0].ns.call(socket.create_server, (SERVER, 5006))

    def serve() -> None:
        ls.settimeout(5)
        conn, _ = ls.accept()
        with conn:
            conn.settimeout(5)
            buf = b""
            while not buf.endswith(b"\n") and (d := conn.recv(100)):
                buf += d
            got.append(buf)

    def client() -> None:
        c = bed[1].ns.call(socket.create_connection, (SERVER, 5006), 5)
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(b"EXPL")
            time.sleep(0.05)
            c.send(b"X", socket.MSG_OOB)
            time.sleep(0.05)
            c.sendall(b"OIT now\n")
            time.sleep(0.3)

    async def main() -> None:
        async with StackQueue(stack, events.extend, netns=bed[0].name):
            t = threading.Thread(target=serve, daemon=True)
            t.start()
            await asyncio.to_thread(client)
            await asyncio.to_thread(t.join, 5)

    try:
        asyncio.run(main())
        delivered = b"".join(e.message.data for e in events if isinstance(e, MessageIn))
        assert got == [b"EXPLXOIT now\n"] and delivered == b"EXPLXOIT now\n"
    finally:
        ls.close()
        rules.remove()
        nft.teardown()


def test_protected_tcp_ports_tell_clients_an_mss_that_fits_the_queues_copy(bed: Testbed) -> None:
    """On jumbo-frame links a segment could be longer than the queue copies (the stack would
    see it cut and drop it, stalling an honest connection): the SYNs to and from a protected
    port carry an MSS of at most MSS_CLAMP, and a large transfer goes through whole."""
    from node.kernel.nfqueue import MSS_CLAMP

    for ns in (bed.switch, bed[0].ns, bed[1].ns):
        ns.set_mtu(9000)
    nft, rules = _kernel(bed)
    nft.protect("tcp", 5000)
    stack = Stack(StackConfig(protected_tcp={5000}, verify_checksums=False))
    data = bytes(range(256)) * 400

    async def main() -> bytes:
        async with StackQueue(stack, lambda events: None, netns=bed[0].name) as sq:
            echoed = await asyncio.to_thread(_tcp_roundtrip, bed, 5000, data)
            assert sq.queue.errors == 0
        return echoed

    try:
        assert asyncio.run(main()) == data
        flow = next(f for f in stack.flows() if f.proto == 6)
        assert max(h.mss or 0 for h in flow.halves) <= MSS_CLAMP
        assert max(h.mss or 0 for h in flow.halves) > 1460  # the links' MTU is 9000
    finally:
        rules.remove()
        nft.teardown()


def test_a_datagram_longer_than_the_queue_copies_does_not_reach_a_verdict_first_port(
        bed: Testbed) -> None:
    """A verdict-first port lets a packet on before the stack sees it: one cut by the queue's
    copy range would reach the service while the stack and the detector saw only its start.
    Dropped; datagrams that fit pass as ever."""
    nft, rules = _kernel(bed)
    nft.protect("udp", 5353)
    stack = Stack(StackConfig(protected_udp={5353}, verify_checksums=False))

    async def main() -> tuple[list[bytes], int, bytes]:
        async with StackQueue(stack, None, netns=bed[0].name, inline_ports=set()) as sq:
            got = await asyncio.to_thread(_udp_exchange, bed, 5353, [b"short", b"L" * 6000],
                                          0.5)  # stops at the first datagram lost
            got += await asyncio.to_thread(_udp_exchange, bed, 5353, [b"after"])
            reply = await asyncio.to_thread(_udp_reply, bed, 5353, b"R" * 6000)
            return got, sq.cut, reply

    try:
        got, cut, reply = asyncio.run(main())
        assert got == [b"short", b"after"] and cut == 1
        assert reply == b"R" * 6000  # the service's own long reply goes on
    finally:
        rules.remove()
        nft.teardown()
