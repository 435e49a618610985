"""``QueueAdapter(thread=True)`` on a real queue in a namespace: the reader thread sleeps in the
binding's own ``recv``; what a packet callback schedules on the clock runs without another
packet arriving (the callback interrupts the sleep), timers fire, and ``close`` ends the thread
while it sleeps with no deadline at all; with ``priority`` it reads as a SCHED_FIFO thread, and
where that cannot be had it reads all the same."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading

import pytest

from node.kernel.nfqueue import Handle, QueueAdapter

pytestmark = pytest.mark.netns
ADDR, PORT, QUEUE = "10.77.251.1", 9999, 7


def _queue_udp(netns) -> None:  # type: ignore[no-untyped-def]
    netns.ip("link", "set", "lo", "up")
    netns.ip("addr", "add", f"{ADDR}/32", "dev", "lo")
    netns.run("iptables", "-w", "5", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport",
              str(PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE))


def test_what_a_callback_schedules_runs_without_another_packet(netns) -> None:  # type: ignore[no-untyped-def]
    _queue_udp(netns)
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
        with _udp(netns.name) as (rx, tx):
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


@pytest.mark.parametrize(("priority", "policy"), [(10, os.SCHED_FIFO),
                                                  (1000, os.SCHED_OTHER)])  # 1000: EINVAL
def test_the_reader_thread_runs_at_its_priority_or_reads_all_the_same(
        netns, priority: int, policy: int) -> None:  # type: ignore[no-untyped-def]
    _queue_udp(netns)
    seen: list[tuple[bytes, int, int]] = []

    def on_packet(payload: bytes, h: Handle) -> None:
        seen.append((payload[28:], os.sched_getscheduler(0), os.sched_getparam(0).sched_priority))
        h.accept()

    loop = asyncio.new_event_loop()
    q = QueueAdapter(QUEUE, on_packet, netns=netns.name, loop=loop, thread=True,
                     priority=priority).start()
    try:
        with _udp(netns.name) as (rx, tx):
            tx.sendto(b"one", (ADDR, PORT))
            assert rx.recv(100) == b"one"
    finally:
        q.close()
        loop.close()
    assert seen == [(b"one", policy, priority if policy == os.SCHED_FIFO else 0)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is left alone


@contextlib.contextmanager
def _udp(ns: str):  # type: ignore[no-untyped-def]
    """A receiver bound to the queued port and a sender, in ``ns``."""
    rx = _in(ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    tx = _in(ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((ADDR, PORT))
        rx.settimeout(5)
        yield rx, tx


def _in(ns: str, fn, *args):  # type: ignore[no-untyped-def]
    from node.testbed.netns import Namespace

    return Namespace.attach(ns).call(fn, *args)


def test_a_reader_that_peeks_reads_on_past_an_overrun(netns) -> None:  # type: ignore[no-untyped-def]
    """A queue socket that overflows reports ENOBUFS once; the binding's read goes on past
    it, and so must a reader that peeks first (``fastack``): no error, no pause."""
    from node.takeover import fastack

    assert fastack._fastack is not None, "node.takeover._fastack is not built"
    _queue_udp(netns)
    got = 0

    def on_packet(payload: bytes, h: Handle) -> None:
        nonlocal got
        got += 1
        h.accept()

    loop = asyncio.new_event_loop()
    q = QueueAdapter(QUEUE, on_packet, netns=netns.name, loop=loop, thread=True)
    q.peek = fastack._fastack.Responder(1 << 16).wait
    q.start()
    try:
        assert q._sock is not None
        q._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # overruns at once
        with _udp(netns.name) as (rx, tx):
            rx.settimeout(0.05)
            for _ in range(20):
                for _ in range(300):
                    tx.sendto(b"x" * 64, (ADDR, PORT))
                with contextlib.suppress(TimeoutError):
                    while rx.recv(100):
                        pass
    finally:
        q.close()
        loop.close()
    assert q.errors == 0
    assert got > 20 * 10  # read on after each overrun (16 of 12000 when a peek stopped it)
