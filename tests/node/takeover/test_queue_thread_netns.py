"""``QueueAdapter(thread=True)`` on a real queue in a namespace: the reader thread sleeps in the
binding's own ``recv``; what a packet callback schedules on the clock runs without another
packet arriving (the callback interrupts the sleep), timers fire, and ``close`` ends the thread
while it sleeps with no deadline at all."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from node.kernel.nfqueue import Handle, QueueAdapter

pytestmark = pytest.mark.netns
ADDR, PORT, QUEUE = "10.77.251.1", 9999, 7


def test_what_a_callback_schedules_runs_without_another_packet(netns) -> None:  # type: ignore[no-untyped-def]
    netns.ip("link", "set", "lo", "up")
    netns.ip("addr", "add", f"{ADDR}/32", "dev", "lo")
    netns.run("iptables", "-w", "5", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport",
              str(PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE))
    soon, later = threading.Event(), threading.Event()
    seen: list[bytes] = []
    loop = asyncio.new_event_loop()

    def on_packet(payload: bytes, h: Handle) -> None:
        seen.append(payload[28:])
        clock = q.clock
        assert clock is not None
        clock.call_soon(h.accept)  # the verdict later, from the clock
        clock.call_soon(soon.set)
        clock.call_later(0.05, later.set)

    q = QueueAdapter(QUEUE, on_packet, netns=netns.name, loop=loop, thread=True).start()
    try:
        rx = _in(netns.name, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        tx = _in(netns.name, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        with rx, tx:
            rx.bind((ADDR, PORT))
            rx.settimeout(5)
            tx.sendto(b"one", (ADDR, PORT))
            assert soon.wait(5), "call_soon waited for another packet"
            assert rx.recv(100) == b"one"  # accepted by the clock's callback
            assert later.wait(5)
        assert seen == [b"one"] and q.held == 0 and q.verdicts == 1
    finally:
        thread = q._thread
        q.close()  # the thread sleeps with no deadline now
        loop.close()
    assert thread is not None and not thread.is_alive()


def _in(ns: str, fn, *args):  # type: ignore[no-untyped-def]
    from node.testbed.netns import Namespace

    return Namespace.attach(ns).call(fn, *args)
