"""User-space filter checks on the stack's queue path, in namespaces, no mocks: a real TCP client
and server, the httpd sample's general filter (a field after a delimiter: nft cannot say it)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import pytest

from filters.condition import Field, Filter, General, Overflow, Pin, Specific
from filters.generate import generate_filters
from filters.nft import FilterTable, NftError, base_chains
from filters.userspace import UserspaceFilters
from node.filtering import FilterGate
from node.kernel.inline import StackQueue
from node.kernel.marks import MASK, QUEUE_STACK
from node.kernel.nft import NftTable
from node.kernel.queue_rules import QueueRules
from node.stack import Stack, StackConfig
from node.testbed import Testbed
from node.testbed.sink import collect_streams
from sca.emu.image import load_image
from sca.generate import Detector
from sca.services import manifest_path, traffic
from sca.verify import Verifier

pytestmark = pytest.mark.netns
SERVER = "10.77.0.1"
PORT = 8080


def _filters_for(name: str):  # type: ignore[no-untyped-def]
    """The sample's filters, from its canonical exploit's verified alert."""
    image = load_image(manifest_path(name))
    det, ver = Detector(image), Verifier([image])
    msgs = tuple(traffic(name).exploit())
    g = det.generate(msgs, det.inspect(msgs).detection, ver)  # type: ignore[arg-type]
    assert g is not None
    gen = generate_filters(g.alert, image, detector=det, verifier=ver)
    assert gen.general is not None
    return gen


@pytest.fixture(scope="module")
def httpd_filter():  # type: ignore[no-untyped-def]
    f = _filters_for("httpd").general
    # The same condition on this test's port.
    return type(f)(f.service_id, f.service_name, f.proto, PORT, f.condition)


def _server(bed: Testbed, received: list[bytes]) -> socket.socket:
    ls = bed[0].ns.call(socket.create_server, (SERVER, PORT))
    ls.settimeout(10)
    collect_streams(ls, received)
    return ls


def _send(bed: Testbed, chunks: list[bytes]) -> str:
    c = bed[1].ns.call(socket.create_connection, (SERVER, PORT), 3)
    c.settimeout(3)
    try:
        for chunk in chunks:
            c.sendall(chunk)
            time.sleep(0.05)  # separate segments
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
        return "closed"
    except TimeoutError:
        return "stalled"
    except OSError:
        return "reset"
    finally:
        c.close()


def test_tcp_exploit_is_stopped_in_user_space_and_benign_passes(testbed: Testbed,
                                                                  httpd_filter) -> None:  # type: ignore[no-untyped-def]
    bed = testbed
    nft = NftTable(bed[0].name)
    nft.ensure()
    QueueRules(netns=bed[0].name).install()
    nft.protect("tcp", PORT)
    gate = FilterGate(UserspaceFilters([httpd_filter]))
    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    exploit = b"".join(m.data for m in traffic("httpd").exploit(random.Random(3)))
    benign = [b"".join(m.data for m in s) for s in
              (traffic("httpd").benign(random.Random(i)) for i in range(3))]
    received: list[bytes] = []

    async def main() -> list[str]:
        ls = _server(bed, received)
        async with StackQueue(stack, gate=gate, inline_ports={(6, PORT)}, netns=bed[0].name):
            outcomes = [await asyncio.to_thread(_send, bed, [b]) for b in benign]
            half = len(exploit) // 2  # the exploit split across two segments
            outcomes.append(await asyncio.to_thread(_send, bed, [exploit[:half],
                                                                 exploit[half:]]))
            await asyncio.sleep(0.3)
        ls.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes[:3] == ["closed"] * 3
    assert gate.hits >= 1
    assert all(any(r == b for r in received) for b in benign)
    # Nothing that completes the exploit reached the server: at most the segment before the
    # one that made the stream match.
    assert not any(httpd_filter.matches(r) or exploit in r for r in received)


def test_a_tcp_specific_filter_is_checked_on_the_stream_not_on_each_segment(
        testbed: Testbed) -> None:
    """Installed the node's way (kernel part, then what needs user space): the exploit's
    connection is stopped, and a benign upload whose second segment holds the specific bytes
    at the same offset within that segment passes (nft's ``@ih`` would count from there)."""
    bed = testbed
    f = _filters_for("httpd").specific
    spec = type(f)(f.service_id, f.service_name, f.proto, PORT, f.condition)
    nft = NftTable(bed[0].name)
    nft.ensure()
    QueueRules(netns=bed[0].name).install()
    nft.protect("tcp", PORT)  # a protected service's packets, both ways, as on a node
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
    gate = FilterGate(UserspaceFilters(c.filter for c in table.install([spec]) if c.userspace))
    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    exploit = b"".join(m.data for m in traffic("httpd").exploit())
    c = spec.condition
    upload = [b"POST /upload HTTP/1.0\r\nContent-Length: 300\r\n\r\n",
              b"x" * c.offset + c.value + b"y" * 20]
    received: list[bytes] = []

    async def main() -> list[str]:
        ls = _server(bed, received)
        async with StackQueue(stack, gate=gate, inline_ports={(6, PORT)}, netns=bed[0].name):
            outcomes = [await asyncio.to_thread(_send, bed, chunks)
                        for chunks in (upload, [exploit])]
            await asyncio.sleep(0.3)
        ls.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes[0] == "closed" and b"".join(upload) in received
    assert gate.hits == 1 and spec.matches(exploit)
    assert not any(spec.matches(r) for r in received)  # the server got none of the exploit


def test_specific_filters_with_any_value_are_removed(testbed: Testbed) -> None:
    """nft lists a 64-bit set value with its top bit set as a negative number: the removal
    made from that listing must still name the element. A value too long for a set key
    (libnftables aborted on one) is installed and removed as well."""
    nft = NftTable(testbed[0].name)
    nft.ensure()
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
    fs = [Filter(b"\x01" * 32, "svc", "udp", 1434, Specific(3, v))
          for v in (b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\x80" + bytes(7), b"\xfe" * 16,
                    b"\x01" * 61)]  # longer than a set key: checked in user space
    table.install(fs)
    assert {i.filter_id for i in table.list()} == {f.filter_id for f in fs}
    table.remove([fs[0].filter_id, fs[1].filter_id])
    assert {i.filter_id for i in table.list()} == {f.filter_id for f in fs[2:]}
    table.sync([])
    assert table.list() == []


def test_a_filter_an_older_herdwall_installed_in_another_shape_is_replaced(
        testbed: Testbed) -> None:
    """Before, a TCP specific filter was a set element matched on each segment: a sync puts
    it where this herdwall checks it (the stream, in user space), in one batch."""
    nft = NftTable(testbed[0].name)
    nft.ensure()
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
    f = Filter(b"\x01" * 32, "svc", "tcp", PORT, Specific(200, b"P\x12C"))
    nft.apply_text("\n".join([*base_chains(),
        "add set inet herdwall spec_tcp_1600_24 { typeof tcp dport . @ih,1600,24; counter; }\n"
        "add rule inet herdwall filters tcp dport . @ih,1600,24 @spec_tcp_1600_24 "
        'reject with tcp reset comment "set:spec_tcp_1600_24"\n'
        f'add element inet herdwall spec_tcp_1600_24 {{ {PORT} . 0x501243 comment '
        f'"hw:{f.filter_id}" }}']) + "\n")
    table.sync([f])
    listed = json.dumps(nft.query_text("list table inet herdwall"))
    assert f"uq_tcp_{PORT}" in listed and "0x501243" not in listed and "5247555" not in listed
    assert [i.filter_id for i in table.list()] == [f.filter_id]
    table.sync([f])  # in its place now: nothing to do
    assert [i.filter_id for i in table.list()] == [f.filter_id]


def test_user_space_filters_of_a_port_share_one_rule(testbed: Testbed) -> None:
    """However many filters a port has in user space (verified alerts can bring thousands),
    the chain every packet passes holds one rule for it, gone with its last filter."""
    nft = NftTable(testbed[0].name)
    nft.ensure()
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
    fs = [Filter(b"\x01" * 32, "svc", "tcp", PORT, Specific(3, i.to_bytes(2, "big") * 16))
          for i in range(300)]
    table.install(fs[:200])
    table.install(fs[200:])

    def queue_rules() -> list[object]:
        listed = nft.query_text("list table inet herdwall")["nftables"]
        return [i for i in listed if i.get("rule", {}).get("chain") == "filter_queue"]

    assert len(queue_rules()) == 1
    assert {i.filter_id for i in table.list()} == {f.filter_id for f in fs}
    table.remove([f.filter_id for f in fs[:299]])
    assert {i.filter_id for i in table.list()} == {fs[299].filter_id}
    assert len(queue_rules()) == 1
    table.sync([])  # the last one: the port's packets no longer go to the queue
    assert table.list() == [] and queue_rules() == []
    table.install(fs[:1])  # and come back with its next filter, with no listing between
    assert len(queue_rules()) == 1


@pytest.fixture(scope="module")
def resolver_filters():  # type: ignore[no-untyped-def]
    return _filters_for("resolver")


def test_udp_filters_in_the_kernel_between_namespaces(testbed: Testbed,
                                                      resolver_filters) -> None:  # type: ignore[no-untyped-def]
    """Installed through the node's NftTable in the server's namespace; a real client in
    another namespace sends exploit variants and benign datagrams over the veth."""
    bed = testbed
    nft = NftTable(bed[0].name)
    nft.ensure()
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
    table.install([resolver_filters.specific, resolver_filters.general])
    t = traffic("resolver")
    exploits = [m.data for i in range(20) for m in t.exploit(random.Random(i))
                if resolver_filters.general.matches(m.data)]
    rng = random.Random(4)
    benign = [m.data for _ in range(30) for m in t.benign(rng)]
    srv = bed[0].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    cli = bed[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((SERVER, 1434))
        srv.settimeout(0.3)
        got = []
        for d in exploits + benign:
            cli.sendto(d, (SERVER, 1434))
            try:
                got.append(srv.recv(65536))
            except TimeoutError:
                got.append(None)
    assert got[:len(exploits)] == [None] * len(exploits)
    assert got[len(exploits):] == benign
    # Every drop is counted, on the filter that caught it (the specific one comes first).
    assert sum(i.packets for i in table.list()) == len(exploits)


def test_installs_list_the_table_once_and_recover_when_it_changes_behind_them(
        testbed: Testbed, resolver_filters) -> None:  # type: ignore[no-untyped-def]
    """The table keeps what its own batches did, so an install on an alert's path lists
    nothing; a table changed by someone else makes the next batch fail, and the install then
    looks and succeeds."""
    nft = NftTable(testbed[0].name)
    nft.ensure()
    listings: list[str] = []

    def query(cmd: str) -> dict[str, object]:
        listings.append(cmd)
        return nft.query_text(cmd)

    table = FilterTable(nft.apply_text, query, queue_mark=QUEUE_STACK, mark_mask=MASK)
    spec, gen = resolver_filters.specific, resolver_filters.general
    with pytest.raises(NftError):  # nothing known yet, and told not to look
        table.install([spec], look=False)
    assert listings == [] and not table.knows_table
    assert [c.filter.filter_id for c in table.install([spec])] == [spec.filter_id]
    assert len(listings) == 1
    assert table.install([spec]) == []  # already there: no second element, no listing
    assert len(listings) == 1
    assert {i.filter_id for i in table.list()} == {spec.filter_id}
    nft.apply_text("delete table inet herdwall\n")  # an operator, behind the node's back
    with pytest.raises(NftError):  # the batch fails; not told to look: no listing, no retry
        table.install([gen], look=False)
    assert not table.knows_table
    assert [c.filter.filter_id for c in table.install([gen])] == [gen.filter_id]
    assert {i.filter_id for i in table.list()} == {gen.filter_id}
    # A removal lists (it needs the handles) and knows what its batch left: the next
    # install lists nothing, nor does one after a sync.
    table.remove([gen.filter_id])
    n = len(listings)
    assert [c.filter.filter_id for c in table.install([gen])] == [gen.filter_id]
    assert len(listings) == n
    table.sync([spec])
    assert [c.filter.filter_id for c in table.install([gen])] == [gen.filter_id]
    assert len(listings) == n + 1
    assert {i.filter_id for i in table.list()} == {spec.filter_id, gen.filter_id}


def test_a_blocked_request_sent_again_is_checked_again_once_its_block_is_forgotten(
        httpd_filter) -> None:  # type: ignore[no-untyped-def]
    """The gate's bound on blocked connections forgets the oldest: the matched request's
    bytes count as never delivered, so its resend is checked and dropped again (the stack's
    own decision on crafted packets; no kernel needed)."""
    from node.stack.packet import ACK, SYN
    from node.takeover.tcp import Segment
    from node.takeover.wire import build

    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    gate = FilterGate(UserspaceFilters([httpd_filter]), stack=stack)
    cli, srv = bytes([10, 77, 1, 2]), bytes([10, 77, 0, 1])
    exploit = b"".join(m.data for m in traffic("httpd").exploit(random.Random(3)))

    def send(client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> bool:
        seg = Segment(seq, ack, flags, 65535, data, None, None)
        p = build(cli, srv, 40000, PORT, seg) if client else build(srv, cli, PORT, 40000, seg)
        return gate(p, stack.handle(p, 0.0))  # True: dropped

    assert not send(True, 100, 0, SYN)
    assert not send(False, 500, 101, SYN | ACK)
    assert not send(True, 101, 501, ACK)
    assert send(True, 101, 501, ACK, exploit)
    gate.blocked.clear()  # as when MAX_BLOCKED later connections have pushed it out
    assert send(True, 101, 501, ACK, exploit)  # checked again, not a duplicate
    assert gate.hits == 2


def test_past_its_bound_a_stream_is_still_checked_by_filters_that_may_hold_anywhere() -> None:
    """The gate keeps a stream's first 64 KiB; a later chunk is checked on its own against the
    general filters (which may start anywhere), also one added after the bound was reached,
    and never against a specific filter (its offset counts from the stream's start)."""
    from node.filtering import MAX_STREAM
    from node.stack.events import MessageIn
    from sca.alert import Message

    general = Filter(b"\x01" * 32, "svc", "tcp", PORT, General(
        (Pin(0, ord("X")),), Overflow("terminated", Field(1), 8, (0,)), sliding=True))
    spec = Filter(b"\x01" * 32, "svc", "tcp", PORT, Specific(0, b"X" * 9))
    us = UserspaceFilters([spec])
    gate = FilterGate(us)

    def chunk(data: bytes) -> bool:
        return gate._message(MessageIn(7, 6, PORT, Message(data, 7), 0), b"")

    assert not any(chunk(b"a" * 1000) for _ in range(MAX_STREAM // 1000 + 1))
    assert not chunk(b"X" * 9)  # past the bound: the specific filter does not look
    us.add(general)
    assert chunk(b"X" * 9) and gate.hits == 1
