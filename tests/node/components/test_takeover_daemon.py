"""A real ``herdwall node run`` in the router between a client and a server, with
``[filters] tcp_action = "takeover"``: its detector catches the mgmtd exploit, the filters it
derives hand the port's flows to the takeover, and a live connection that carries benign
lines, then the exploit, then benign lines again is taken over mid-stream. The server gets the
benign lines, in order, and never the exploit; the client sees no reset under scrub and a FIN
(with the configured reply) under respond; the node counts the takeover in its events and
status. The server on the wire is a plain line server (no service code)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.takeover.harness import LineServer, delta, recv_until, tcp_counters
from node.takeover.topo import PathTopo
from node.testbed.daemons import NodeProc, NodeSpec
from sca.services import traffic

pytestmark = [pytest.mark.netns, pytest.mark.slow]
PORT = 7070  # mgmtd's
BEFORE = b"PING\n"
AFTER = b"RUN status nagios\n"


@pytest.fixture(scope="module")
def exploit() -> bytes:
    messages = traffic("mgmtd").exploit()  # the canonical one: a single line
    assert len(messages) == 1
    return bytes(messages[0].data)


def _node(t: PathTopo, tmp: Path, policy: str, reply: str = "") -> NodeProc:
    spec = NodeSpec(t.router.name, t.router_c, detector=True, services=("mgmtd",), settings={
        "overlay": {"enabled": False}, "throttle": {"enabled": False},
        "filters": {"tcp_action": "takeover"},
        "takeover": {"policy": policy, "reply": reply}})
    return NodeProc(spec, tmp)


@pytest.fixture
def topo() -> Iterator[PathTopo]:
    t = PathTopo("tkdmn")
    try:
        yield t
    finally:
        t.close()


def _filters_from_detection(node: NodeProc, exploit: bytes) -> set[str]:
    """The node detects the exploit (submitted as its stack would) and installs filters."""
    node.request("detector.submit", service="mgmtd", messages=[[0, exploit.hex()]],
                 packets=[[(b"\x45\x00" + exploit[:20]).hex()]])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = node.request("filters")
        if rows and all(r.get("in_kernel") for r in rows) and \
                {r.get("kind") for r in rows} >= {"specific", "general"}:
            return {r["filter_id"] for r in rows}
        time.sleep(0.1)
    raise TimeoutError(f"no filters in the kernel: {node.tail()}")


def _connect(t: PathTopo) -> socket.socket:
    c = t.client.call(socket.create_connection, (t.server_addr, PORT), 5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _event(node: NodeProc, kind: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = node.first(kind)
        if rec is not None:
            return rec
        time.sleep(0.05)
    raise TimeoutError(f"no {kind} event: {node.tail()}")


def test_daemon_takes_over_a_flagged_flow_and_scrubs_it(topo: PathTopo, tmp_path: Path,
                                                        exploit: bytes) -> None:
    node = _node(topo, tmp_path, "scrub")
    srv = LineServer(topo.server, topo.server_addr, PORT)
    try:
        node.start()
        node.wait_ready()
        comps = {c["name"]: c["state"] for c in node.request("status")["components"]}
        assert comps.get("takeover") == "running", comps
        ids = _filters_from_detection(node, exploit)
        before = tcp_counters(topo.client)
        c = _connect(topo)
        c.sendall(BEFORE)
        got = recv_until(c, b"ok 1\n")
        c.sendall(exploit)
        time.sleep(0.3)  # the exploit in a segment of its own, mid-stream
        c.sendall(AFTER)
        got += recv_until(c, b"ok 2\n")
        c.shutdown(socket.SHUT_WR)
        rest = recv_until(c, b"\0", timeout=5)  # the server's FIN, through the node
        c.close()
        conn = srv.wait(1, 10)[0]
        after = tcp_counters(topo.client)
        started = _event(node, "takeover.started")
        status = {c["name"]: c for c in node.request("status")["components"]}["takeover"]
    finally:
        node.stop()
        srv.close()
    assert got == b"ok 1\nok 2\n" and rest == b""
    assert bytes(conn.received) == BEFORE + AFTER and conn.eof and conn.error is None
    assert delta(after, before, "EstabResets")["EstabResets"] == 0
    assert started["filter_id"] in ids and started["policy"] == "scrub"
    assert started["flow"].endswith(f"-> {topo.server_addr}:{PORT}")
    assert status["status"]["taken_over"] == 1, status


def test_daemon_respond_policy_replies_and_closes(topo: PathTopo, tmp_path: Path,
                                                  exploit: bytes) -> None:
    node = _node(topo, tmp_path, "respond", reply="ERR blocked by herdwall\n")
    srv = LineServer(topo.server, topo.server_addr, PORT)
    try:
        node.start()
        node.wait_ready()
        _filters_from_detection(node, exploit)
        before = tcp_counters(topo.client)
        c = _connect(topo)
        c.sendall(BEFORE)
        got = recv_until(c, b"ok 1\n")
        c.sendall(exploit)
        got += recv_until(c, b"\0", timeout=5)  # the reply, then the node's FIN
        c.close()
        conn = srv.wait(1, 10)[0]
        after = tcp_counters(topo.client)
        _event(node, "takeover.started")
    finally:
        node.stop()
        srv.close()
    assert got == b"ok 1\nERR blocked by herdwall\n"
    # The server saw the benign line and an ordinary end of stream.
    assert bytes(conn.received) == BEFORE and conn.eof and conn.error is None
    assert delta(after, before, "EstabResets")["EstabResets"] == 0


def test_a_connection_open_before_the_filters_is_taken_over_mid_stream(
        topo: PathTopo, tmp_path: Path, exploit: bytes) -> None:
    """The filters come while a connection is open: the takeover queue picks it up mid-stream
    (no handshake seen, window scale unknown) and still takes it over at the exploit."""
    node = _node(topo, tmp_path, "scrub")
    srv = LineServer(topo.server, topo.server_addr, PORT)
    try:
        node.start()
        node.wait_ready()
        c = _connect(topo)
        c.sendall(BEFORE)
        got = recv_until(c, b"ok 1\n")
        _filters_from_detection(node, exploit)
        c.sendall(BEFORE)  # now through the takeover queue, which picks the flow up
        got += recv_until(c, b"ok 2\n")
        c.sendall(exploit)
        time.sleep(0.3)
        c.sendall(AFTER)
        got += recv_until(c, b"ok 3\n")
        c.close()
        conn = srv.wait(1, 10)[0]
        _event(node, "takeover.started")
    finally:
        node.stop()
        srv.close()
    assert got == b"ok 1\nok 2\nok 3\n"
    assert bytes(conn.received) == BEFORE + BEFORE + AFTER and conn.error is None
