"""Takeover on real kernels in namespaces, no mocks: client, node and server, with the node in
the path (a router namespace) and on the server's host. Real sockets on both ends; the node reads
its NFQUEUE and sends through its raw socket. Checks what each application got, that the
malicious bytes never reached the server, that the client saw no reset under scrub and close,
and the kernels' own retransmission counters on both sides."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from filters.condition import Field, Filter, General, Overflow, Pin, Specific
from filters.userspace import UserspaceFilters
from node.takeover import rules
from node.takeover.engine import TakeoverEngine
from node.takeover.harness import (
    LineServer,
    Node,
    delta,
    recv_until,
    starts_with,
    tcp_counters,
)
from node.takeover.policy import Close, Policy, Respond, Scrub
from node.takeover.repair import RepairEngine
from node.takeover.reset import ResetEngine
from node.takeover.tcp import Config, Segment
from node.takeover.topo import HostTopo, PathTopo
from node.testbed.netns import leftovers

pytestmark = pytest.mark.netns
PORT = 8080
BEFORE = b"GET /a benign-1\n"
EXPLOIT = b"EXPLOIT " + b"A" * 300 + b"\n"
AFTER = b"GET /b benign-2\n"
COUNTERS = ("RetransSegs", "OutRsts", "EstabResets", "InErrs")


def _policy(name: str) -> Policy:
    return {"scrub": Scrub(), "close": Close(), "respond": Respond(reply=b"BLOCKED\n")}[name]


@pytest.fixture(params=["path", "host"])
def topo(request: pytest.FixtureRequest) -> Iterator[PathTopo | HostTopo]:
    t = PathTopo("tko") if request.param == "path" else HostTopo("tko")
    try:
        yield t
    finally:
        t.close()


def _client(t: PathTopo | HostTopo) -> socket.socket:
    c = t.client.call(socket.create_connection, (t.server_addr, PORT), 5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _exchange(t: PathTopo | HostTopo, engine: object, fast: bool = True) -> dict[str, object]:
    """One connection: a benign request and its reply, the exploit, another benign request,
    the client's end of stream; what both sides got and the kernels' counters. ``fast``: the
    trigger's ACK may go out from C (``fastack``)."""
    node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"),  # type: ignore[arg-type]
                fast=fast)
    srv = LineServer(t.server, t.server_addr, PORT)
    before = tcp_counters(t.client), tcp_counters(t.server)
    got, error = b"", None
    try:
        c = _client(t)
        try:
            c.sendall(BEFORE)
            got += recv_until(c, b"ok 1\n")
            c.sendall(EXPLOIT)
            time.sleep(0.5)  # past the client's RTO: a lost ACK of the exploit shows as a resend
            c.sendall(AFTER)
            got += recv_until(c, b"\n", 3)
            c.shutdown(socket.SHUT_WR)
            got += recv_until(c, b"\x00", 3)  # to the end of stream
        except OSError as exc:
            error = type(exc).__name__
        finally:
            c.close()
        conn = srv.wait(1, 10)[0]
        time.sleep(0.3)
        after = tcp_counters(t.client), tcp_counters(t.server)
    finally:
        node.close()
        srv.close()
    return {"client_got": got, "client_error": error, "server_got": bytes(conn.received),
            "server_eof": conn.eof, "server_error": conn.error,
            "client": delta(after[0], before[0], *COUNTERS),
            "server": delta(after[1], before[1], *COUNTERS), "node": node}


@pytest.mark.parametrize(("policy", "fast"), [("scrub", True), ("close", True),
                                              ("respond", True), ("scrub", False)])
def test_takeover_policies(topo: PathTopo | HostTopo, policy: str, fast: bool) -> None:
    """Each policy, with the trigger's ACK from C (``fastack``) and, for scrub, from the
    Python path too."""
    engine = TakeoverEngine(netns=topo.node.name, nft=rules.NftText(topo.node.name),
                            policy=lambda t: _policy(policy))
    # No tail loss probes on the client: a retransmission of the exploit then means its ACK
    # never came (RTO, 200 ms or more), not that it came late on a loaded machine.
    topo.client.run(["sysctl", "-qw", "net.ipv4.tcp_early_retrans=0"])
    r = _exchange(topo, engine, fast)
    assert engine.stats["taken_over"] == 1
    assert engine.stats["sent_fast"] == fast
    assert b"EXPLOIT" not in r["server_got"]  # type: ignore[operator]
    if policy == "scrub":
        assert r["server_got"] == BEFORE + AFTER  # both benign requests, intact, in order
        assert r["client_got"] == b"ok 1\nok 2\n"
    else:
        assert r["server_got"] == BEFORE
        reply = b"BLOCKED\n" if policy == "respond" else b""
        assert r["client_got"] == b"ok 1\n" + reply
    # Graceful ends: no reset anywhere, the server saw an ordinary end of stream.
    assert r["client_error"] is None and r["server_error"] is None and r["server_eof"]
    for side in ("client", "server"):
        counters = r[side]
        assert counters["EstabResets"] == 0 and counters["OutRsts"] == 0, (side, counters)
        assert counters["RetransSegs"] <= 1, (side, counters)  # no storms (none expected)
    assert engine.stats["send_errors"] == 0
    # The trigger's ACK went straight back onto the interface the trigger came in on (and the
    # client took it: it did not resend the exploit).
    assert engine.stats["sent_link"] == 1 and engine.stats["link_errors"] == 0
    assert r["client"]["RetransSegs"] == 0, r["client"]


def test_bulk_both_ways_through_a_taken_over_connection() -> None:
    with PathTopo("tkb") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT, echo=True)
        data = b"".join(b"%07d benign line\n" % i for i in range(120_000))  # 2 MB of lines
        before = tcp_counters(t.client), tcp_counters(t.server)
        try:
            c = _client(t)
            c.sendall(EXPLOIT)
            time.sleep(0.05)
            back = bytearray()

            def read() -> None:
                c.settimeout(30)
                while len(back) < len(data):
                    d = c.recv(1 << 16)
                    if not d:
                        break
                    back.extend(d)

            reader = threading.Thread(target=read)
            reader.start()
            c.sendall(data)
            reader.join(60)
            c.close()
            conn = srv.wait(1, 10)[0]
            time.sleep(0.2)
            after = tcp_counters(t.client), tcp_counters(t.server)
        finally:
            node.close()
            srv.close()
    assert hashlib.sha256(bytes(conn.received)).digest() == hashlib.sha256(data).digest()
    assert bytes(back) == data  # echoed back through the proxy, in order
    for i in (0, 1):
        assert delta(after[i], before[i], *COUNTERS)["RetransSegs"] <= 5


def _lossy(ns_name: str, one_in: int) -> None:
    """Drop about one packet in ``one_in`` of port 8080 traffic both ways, in this
    namespace only (a table of its own)."""
    rules.NftText(ns_name).apply([
        "add table inet hwloss",
        "add chain inet hwloss in { type filter hook input priority 0; policy accept; }",
        "add chain inet hwloss out { type filter hook output priority 0; policy accept; }",
        f"add rule inet hwloss in tcp sport {PORT} numgen random mod {one_in} == 0 drop",
        f"add rule inet hwloss out tcp dport {PORT} numgen random mod {one_in} == 0 drop",
        f"add rule inet hwloss in tcp dport {PORT} numgen random mod {one_in} == 0 drop",
        f"add rule inet hwloss out tcp sport {PORT} numgen random mod {one_in} == 0 drop",
    ])


def test_a_trigger_from_any_cpu_is_taken_over_by_that_cpus_reader() -> None:
    """With the watch queue fanned out by CPU (``readers``, one per CPU by default), one
    reader pinned to each: whichever CPU the client sends from, its trigger is taken over (a
    queue with no reader would let it pass to the server), and the queue of that CPU read it."""
    cpus = sorted(os.sched_getaffinity(0))
    readers = min(len(cpus), 8)
    with PathTopo("tkc") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"), readers=readers)
        srv = LineServer(t.server, t.server_addr, PORT)
        got: list[bytes] = []

        def client(cpu: int) -> None:
            os.sched_setaffinity(0, {cpu})  # this thread only: its packets are that CPU's
            c = _client(t)
            try:
                c.sendall(BEFORE)
                reply = recv_until(c, b"ok 1\n")
                c.sendall(EXPLOIT)
                time.sleep(0.05)
                c.sendall(AFTER)
                got.append(reply + recv_until(c, b"ok 2\n", 3))
            finally:
                c.close()

        try:
            for cpu in cpus:
                th = threading.Thread(target=client, args=(cpu,))
                th.start()
                th.join(15)
            conns = srv.wait(len(cpus), 10)
        finally:
            node.close()
            srv.close()
    queues = node.queue.queues
    assert len(queues) == readers
    assert engine.stats["taken_over"] == len(cpus)
    assert got == [b"ok 1\nok 2\n"] * len(cpus)
    assert [bytes(x.received) for x in conns] == [BEFORE + AFTER] * len(cpus)
    for i, q in enumerate(queues):
        if any(c % len(queues) == i for c in cpus):
            assert q.received > 0, (i, [q.received for q in queues])


def test_a_benign_upload_read_out_of_order_by_per_cpu_readers_loses_nothing() -> None:
    """A watched flow whose sender moves between CPUs: with the queue fanned out by CPU, its
    segments reach the readers out of order. The node holds those until their turn instead of
    dropping them: the upload arrives whole, no segment is dropped by the node, and the client
    resends (next to) nothing."""
    cpus = sorted(os.sched_getaffinity(0))
    data = bytes(range(256)) * (8 << 12)  # 8 MB
    with PathTopo("tko") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"),
                    readers=min(len(cpus), 8))
        srv = LineServer(t.server, t.server_addr, PORT, sink=True)
        try:
            c = _client(t)
            before = tcp_counters(t.client)

            def upload() -> None:
                for i in range(0, len(data), 64 << 10):  # the sender hops CPUs as it goes
                    os.sched_setaffinity(0, {cpus[(i >> 16) % len(cpus)]})
                    c.sendall(data[i:i + (64 << 10)])
                c.shutdown(socket.SHUT_WR)

            th = threading.Thread(target=upload)
            th.start()
            th.join(60)
            conn = srv.wait(1, 60)[0]
            c.close()
            time.sleep(0.2)
            retx = delta(tcp_counters(t.client), before, "RetransSegs")["RetransSegs"]
            stats = node.call(lambda: Counter(node.queue.stats))
        finally:
            node.close()
            srv.close()
    assert bytes(conn.received) == data and conn.eof
    assert engine.stats["taken_over"] == 0
    assert stats["ooo_dropped"] == stats["held_dropped"] == stats["ooo_expired"] == 0, stats
    assert stats["ooo_released"] == stats["ooo_held"], stats  # every held segment went on
    assert retx <= 10, (retx, stats)  # 8 MB is ~5800 segments: no storm


def test_an_exploit_split_across_reordered_segments_is_caught() -> None:
    """The exploit's first segment is lost on the way to the node and resent (RTO): its second
    arrives first and is held (the server gets nothing of it), the resend fills the hole, the
    whole message matches and the flow is taken over; the server gets only the benign bytes
    after it."""
    with PathTopo("tkh") as t:
        # In the node's namespace, before its own chains: the first segment that starts with
        # "EXPL" is lost once (its resend passes: the quota is spent).
        rules.NftText(t.node.name).apply([
            "add table inet hwreorder",
            "add chain inet hwreorder pre { type filter hook prerouting priority -400; "
            "policy accept; }",
            f"add rule inet hwreorder pre tcp dport {PORT} @th,256,32 0x4558504c "
            "quota until 100 bytes drop",
        ])
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            c.sendall(EXPLOIT[:4])  # lost
            time.sleep(0.01)
            c.sendall(EXPLOIT[4:])  # first at the node: held
            time.sleep(1.0)  # the resend of the first (RTO)
            c.sendall(AFTER)
            got = recv_until(c, b"ok 1\n", 3)
            c.close()
            conn = srv.wait(1, 10)[0]
            stats = node.call(lambda: Counter(node.queue.stats))
        finally:
            node.close()
            srv.close()
    assert engine.stats["taken_over"] == 1 and node.queue.triggers[0].data == EXPLOIT
    assert bytes(conn.received) == AFTER and got == b"ok 1\n"
    assert stats["ooo_held"] >= 1 and stats["ooo_released"] == 0, stats


@pytest.mark.slow
def test_loss_on_both_sides_is_repaired_without_storms() -> None:
    with PathTopo("tkl") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT, sink=True)
        data = bytes(range(256)) * 4000  # 1 MB
        try:
            c = _client(t)
            c.sendall(EXPLOIT)
            time.sleep(0.05)
            _lossy(t.client.name, 50)
            _lossy(t.server.name, 50)
            before = tcp_counters(t.client), tcp_counters(t.server)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            recv_until(c, b"\x00", 60)
            c.close()
            conn = srv.wait(1, 60)[0]
            time.sleep(0.5)
            after = tcp_counters(t.client), tcp_counters(t.server)
            proxies = node.call(lambda: engine.finished + engine.owned())
        finally:
            node.close()
            srv.close()
    got = bytes(conn.received)
    assert got == data and conn.eof
    sent = len(data) // 1448
    client_retx = delta(after[0], before[0], "RetransSegs")["RetransSegs"]
    node_retx = sum(p.a.stats["retransmits"] + p.b.stats["retransmits"] for p in proxies)
    # about 2% lost each way on each side: retransmissions stay within a small multiple
    assert 0 < node_retx < sent * 0.15, node_retx
    assert client_retx < sent * 0.15, client_retx


# A general filter (it may hold anywhere in the stream): "EXPLOIT " and 300 bytes with no line
# end, after a benign line; a specific one: the exploit's first 32 bytes after the benign line.
GENERAL = Filter(b"\x01" * 32, "linesvc", "tcp", PORT, General(
    tuple(Pin(i, b) for i, b in enumerate(b"EXPLOIT ")),
    Overflow("terminated", Field(8), 300, (0x0A,)), sliding=True))
SPECIFIC = Filter(b"\x01" * 32, "linesvc", "tcp", PORT, Specific(len(BEFORE), EXPLOIT[:32]))


@pytest.mark.parametrize(("f", "where"), [(GENERAL, "host"), (SPECIFIC, "path")],
                         ids=["general-on-the-servers-host", "specific-in-the-path"])
def test_filter_action_takeover_end_to_end(f: Filter, where: str) -> None:
    """A filter's rules and user-space check take the flow over. A specific filter is one of
    the patterns C checks (``fastack``): the trigger's ACK goes out before any Python runs; a
    general one is answered from Python."""
    setup, rule_lines = rules.compile_takeover(f)
    assert any(f"hw:{f.filter_id}" in r for r in rule_lines)
    with (HostTopo("tkf") if where == "host" else PathTopo("tkf")) as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        # the setup again (it is idempotent), then the filter's rules, as filters.nft would
        node = Node(t.node, engine, PORT, watch=False, extra_rules=[*setup, *rule_lines],
                    filters=UserspaceFilters([f]))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            c.sendall(BEFORE)
            first = recv_until(c, b"ok 1\n")
            c.sendall(EXPLOIT)
            time.sleep(0.1)
            c.sendall(AFTER)
            second = recv_until(c, b"ok 2\n")
            c.close()
            conn = srv.wait(1, 10)[0]
            listing = node.nft.query(f"list chain {rules.TABLE} {rules.WATCH_CHAIN}")
        finally:
            node.close()
            srv.close()
    assert first + second == b"ok 1\nok 2\n"
    assert bytes(conn.received) == BEFORE + AFTER
    assert node.queue.triggers[0].hit is f
    comments = [i["rule"].get("comment") for i in listing["nftables"] if "rule" in i]
    assert comments == [f"hw:{f.filter_id}"] * 4  # MSS clamp and queue mark, each way
    fast = f is SPECIFIC
    assert engine.stats["sent_fast"] == fast and node.queue.stats["fast_unconfirmed"] == 0
    assert node.queue.fast is not None and node.queue.fast.responder.answered == fast


def test_compile_takeover_refuses_udp() -> None:
    f = Filter(b"\x01" * 32, "x", "udp", 53, Specific(0, b"x"))
    with pytest.raises(ValueError):
        rules.compile_takeover(f)


def test_flow_elements_come_and_go() -> None:
    with PathTopo("tke") as t:
        # A libnftables context serves one thread: the engine's is used by the queue's reader.
        nft = rules.NftText(t.node.name)
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name),
                                config=Config(time_wait=0.2))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            c.sendall(EXPLOIT)
            time.sleep(0.2)
            during = nft.query(f"list set {rules.TABLE} {rules.FLOWS}")
            c.close()
            deadline = time.monotonic() + 10
            while engine.owned() and time.monotonic() < deadline:
                time.sleep(0.05)
            after = nft.query(f"list set {rules.TABLE} {rules.FLOWS}")
        finally:
            node.close()
            srv.close()

    def elems(out: dict[str, object]) -> list[object]:
        sets = [i["set"] for i in out["nftables"] if "set" in i]  # type: ignore[index]
        return sets[0].get("elem", []) if sets else []

    assert len(elems(during)) == 2  # both directions
    assert not engine.owned() and elems(after) == []


def test_tcp_repair_baseline_migrates_into_the_os_stack() -> None:
    with PathTopo("tkr") as t:
        engine = RepairEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        r = _exchange(t, engine)
        assert engine.migrated and engine.migrated[0].done
    assert r["server_got"] == BEFORE + AFTER and r["client_got"] == b"ok 1\nok 2\n"
    assert r["client_error"] is None and r["server_eof"]
    assert r["client"]["EstabResets"] == 0  # type: ignore[index]


def test_repair_baseline_refuses_the_machines_own_namespace() -> None:
    with pytest.raises(ValueError):
        RepairEngine(netns="", nft=None)  # type: ignore[arg-type]


def test_reset_baseline_kills_the_connection() -> None:
    with PathTopo("tks") as t:
        engine = ResetEngine(netns=t.node.name)
        r = _exchange(t, engine)
    assert engine.stats["reset"] == 1
    assert r["server_got"] == BEFORE  # the exploit is gone, and so is everything after it
    assert r["client_error"] == "ConnectionResetError"
    assert r["client"]["EstabResets"] == 1  # type: ignore[index]


class _FailingEngine(TakeoverEngine):
    """A takeover that fails at the trigger (whatever the cause)."""

    def answer(self, *a: object) -> None:
        pass

    def trigger(self, *a: object) -> None:
        raise RuntimeError("no takeover this time")


def test_a_failed_takeover_still_keeps_the_message_and_its_resends_from_the_server() -> None:
    """The stack counts the trigger as delivered, so the client's resend of it must not pass
    unchecked: the flow's later client data is dropped (the connection stalls, no reset)."""
    with PathTopo("tkf") as t:
        engine = _FailingEngine(netns=t.node.name)
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            c.sendall(BEFORE)
            got = recv_until(c, b"ok 1\n")
            c.sendall(EXPLOIT)
            time.sleep(1.5)  # several retransmissions of the exploit
            c.sendall(AFTER)
            time.sleep(0.5)
            c.close()
            stats = node.queue.stats
        finally:
            node.close()
            srv.close()
        conn = srv.conns[0]
    assert got == b"ok 1\n"
    assert bytes(conn.received) == BEFORE  # neither the exploit, nor its resends, nor after
    assert stats["trigger_errors"] == 1 and stats["blocked"] >= 2


def test_no_namespaces_left_behind() -> None:
    import os

    mine = [n for n in leftovers() if n.startswith(f"hw-{os.getpid()}-tk")]
    assert mine == []


def test_daemon_path_stack_queue_gate_then_takeover_queue() -> None:
    """How the daemon wires it: the stack's own queue (StackQueue) with a TakeoverGate flags
    the flow and takes it over; the flow's later packets come to the takeover queue."""
    from node.kernel.inline import StackQueue
    from node.kernel.marks import Q_STACK, QUEUE_STACK
    from node.kernel.nft import NftTable
    from node.kernel.queue_rules import QueueRules
    from node.stack import Stack, StackConfig
    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverGate
    from node.takeover.harness import LoopThread

    with HostTopo("tkd") as t:
        ns = t.node.name
        base = NftTable(ns)
        base.ensure()
        base.protect("tcp", PORT)
        rules.NftText(ns).apply(rules.setup())
        QueueRules(netns=ns, queues={QUEUE_STACK: Q_STACK, **rules.queues(1)}).install()
        lt = LoopThread()
        engine = TakeoverEngine(netns=ns, nft=rules.NftText(ns))
        stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))

        def flag(flow: object, e: object, stream: bytes) -> Policy | None:
            return Scrub() if b"EXPLOIT" in stream else None

        gate = TakeoverGate(engine, stack, flag)  # type: ignore[arg-type]
        sq = StackQueue(stack, netns=ns, loop=lt.loop, gate=gate, inline_ports=None)
        tq = TakeoverQueue(engine, netns=ns, loop=lt.loop)
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            lt.call(sq.start)
            lt.call(tq.start)
            c = _client(t)
            c.sendall(BEFORE)
            got = recv_until(c, b"ok 1\n")
            c.sendall(EXPLOIT)
            time.sleep(0.2)
            c.sendall(AFTER)
            got += recv_until(c, b"ok 2\n")
            c.close()
            conn = srv.wait(1, 10)[0]
            owned = tq.stats["owned"]
        finally:
            lt.call(sq.close)
            lt.call(tq.close)
            lt.stop()
            srv.close()
    assert got == b"ok 1\nok 2\n" and bytes(conn.received) == BEFORE + AFTER
    assert gate.stats["taken_over"] == 1
    assert owned > 0  # after the flow's set elements, its packets come to the takeover queue


def test_an_urgent_byte_stays_in_the_stream_the_node_checked() -> None:
    """A client hides an urgent byte inside the exploit: a server that does not read urgent
    data inline (the default) would take it out and get "EXPLOIT" whole, which the node never
    saw. The node sends the segment on not urgent: the server gets exactly the bytes the node
    checked, inline, and its kernel accepts the rewritten segment (no resend)."""
    with PathTopo("tku") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        before = tcp_counters(t.client)
        try:
            c = _client(t)
            c.sendall(b"EXPL")
            time.sleep(0.05)
            c.send(b"X", socket.MSG_OOB)
            time.sleep(0.05)
            c.sendall(b"OIT now\n")
            got = recv_until(c, b"ok 1\n", 3)
            c.close()
            conn = srv.wait(1, 10)[0]
            retx = delta(tcp_counters(t.client), before, "RetransSegs")["RetransSegs"]
            stats = node.call(lambda: Counter(node.queue.stats))
        finally:
            node.close()
            srv.close()
    assert bytes(conn.received) == b"EXPLXOIT now\n" and got == b"ok 1\n"
    assert engine.stats["taken_over"] == 0 and retx == 0, (retx, stats)


def test_an_honest_jumbo_client_is_told_a_smaller_mss_and_checked_whole() -> None:
    """On jumbo-frame links a segment could be longer than what the kernel copies to the queue:
    the watch's SYN clamp tells the client a smaller MSS, so its segments are checked whole."""
    from node.kernel.nfqueue import MSS_CLAMP

    with HostTopo("tkj") as t:
        for ns in (t.client, t.node, t.server):
            ns.set_mtu(9000)
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            c.sendall(BEFORE)
            first = recv_until(c, b"ok 1\n")
            c.send(b"EXPLOIT " + b"A" * 5991 + b"\n")
            c.sendall(b"X" * 20000 + b"\n")  # long segments
            time.sleep(0.3)
            c.close()
            conn = srv.wait(1, 5)[0]
        finally:
            node.close()
            srv.close()
    assert first == b"ok 1\n" and mss <= MSS_CLAMP
    assert engine.stats["taken_over"] == 1 and node.queue.stats["truncated"] == 0
    # the trigger's segment is the message scrub drops; the long segments after it all pass
    got = bytes(conn.received)
    assert got.startswith(BEFORE) and b"EXPLOIT" not in got
    assert got.endswith(b"\n" + b"X" * 20000 + b"\n")


def test_a_segment_longer_than_the_queues_copy_is_dropped_not_passed() -> None:
    """A client that ignores the MSS (here: one segment sent as IP fragments, which the node's
    conntrack joins before the queue) gets its segment cut by the queue's copy range: dropped,
    never passed unchecked, and never stuck in the kernel without a verdict."""
    from node.takeover.wire import build

    TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
    with PathTopo("tkg") as t:
        engine = TakeoverEngine(netns=t.node.name, nft=rules.NftText(t.node.name))
        node = Node(t.node, engine, PORT, detect=starts_with(b"EXPLOIT"))
        srv = LineServer(t.server, t.server_addr, PORT)
        try:
            c = _client(t)
            c.sendall(BEFORE)
            first = recv_until(c, b"ok 1\n")
            # The connection's next sequence numbers, from the client's own kernel.
            c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            seqs = []
            for q in (2, 1):  # send queue, receive queue
                c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, q)
                seqs.append(c.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF)
            c.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
            cport = c.getsockname()[1]
            src, dst = socket.inet_aton(t.client_addr), socket.inet_aton(t.server_addr)
            pkt = build(src, dst, cport, PORT, Segment(seqs[0], seqs[1], 0x18, 500,
                                                       b"EXPLOIT " + b"A" * 5991 + b"\n"))
            raw = t.client.call(socket.socket, socket.AF_INET, socket.SOCK_RAW,
                                socket.IPPROTO_RAW)
            with raw:
                tcp = pkt[20:]
                for off in range(0, len(tcp), 1480):
                    chunk = tcp[off:off + 1480]
                    more = 0x2000 if off + len(chunk) < len(tcp) else 0
                    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), 0x4242,
                                     more | off // 8, 64, 6, 0, src, dst)
                    raw.sendto(ip + chunk, (t.server_addr, 0))  # the kernel sums the header
            time.sleep(0.3)
            held = t.node.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
            c.close()
            conn = srv.wait(1, 5)[0]
        finally:
            node.close()
            srv.close()
    assert first == b"ok 1\n"
    assert b"EXPLOIT" not in conn.received and node.queue.stats["truncated"] == 1
    assert all(line.split()[2] == "0" for line in held.splitlines()), held  # none waiting
