"""The e-mail throttle with a real SMTP client (smtplib) and a real receiving SMTP server
(aiosmtpd), in namespaces: host 0 runs the client and the relay, host 1 the receiving server.

Assertions are on the throttle's decision events and on what the receiving server got, never on
wall-clock timings; the release rate is fast (20/s) to keep the tests short.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

import node.testbed as testbed
from node.throttle import (
    Flagged,
    Passed,
    PassReason,
    Queued,
    Released,
    ThrottleConfig,
    ThrottleCore,
)
from node.throttle.smtp import MailThrottle, SmtpForward

pytestmark = pytest.mark.netns

RELAY_PORT = 2525
MTA_PORT = 2526


class Receiver:
    """The next hop: records every message it accepts, in arrival order."""

    def __init__(self) -> None:
        self.got: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.got.append((list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 OK delivered"


def listener(addr: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    s.setblocking(False)
    return s


def message(rcpts: list[str], n: int) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@a.example", ", ".join(rcpts), f"note {n}"
    m.set_content(f"message {n}\n")
    return m.as_bytes()


Scenario = Callable[[MailThrottle, Receiver, list[Any]], Awaitable[None]]


def run_mail(config: ThrottleConfig, scenario: Scenario) -> tuple[MailThrottle, Receiver, list]:
    """Build the testbed, run the scenario in host 0's namespace, tear everything down."""
    with testbed.Testbed(2, tag="mail") as tb:
        tb.wait_ready()
        mta_sock = tb[1].ns.call(listener, tb[1].addr, MTA_PORT)
        relay_sock = tb[0].ns.call(listener, "127.0.0.1", RELAY_PORT)
        receiver = Receiver()
        events: list[Any] = []
        throttle = MailThrottle(ThrottleCore(config), SmtpForward(tb[1].addr, MTA_PORT,
                                                                   timeout=10),
                                on_event=events.append)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            mta = await loop.create_server(lambda: SMTP(receiver), sock=mta_sock)
            await throttle.start(sock=relay_sock)
            try:
                await asyncio.wait_for(scenario(throttle, receiver, events), timeout=60)
            finally:
                await throttle.close()
                mta.close()
                await mta.wait_closed()

        # The loop runs in a thread inside host 0, so smtplib's worker threads start there too.
        tb[0].ns.call(asyncio.run, main())
    return throttle, receiver, events


async def client_send(batches: list[list[str]]) -> list[Any]:
    """A real SMTP client on host 0: one session, one message per batch; what each returned."""
    def send() -> list[Any]:
        results: list[Any] = []
        with smtplib.SMTP("127.0.0.1", RELAY_PORT, timeout=10) as c:
            for n, rcpts in enumerate(batches):
                try:
                    results.append(c.sendmail("alice@a.example", rcpts, message(rcpts, n)))
                except smtplib.SMTPRecipientsRefused as exc:
                    results.append(exc)
        return results

    return await asyncio.to_thread(send)


async def settle(throttle: MailThrottle) -> None:
    """Until the core has nothing waiting and every delivery is done."""
    while throttle.core.next_deadline() is not None:
        await asyncio.sleep(0.02)
    await throttle.drain()


def test_new_recipients_are_delayed_and_delivered_later_in_order() -> None:
    sent: list[Any] = []

    async def scenario(t: MailThrottle, r: Receiver, ev: list[Any]) -> None:
        batches = [["r1@b.example", "r2@b.example"], ["r1@b.example"], ["R2@b.example"],
                   ["n1@c.example"], ["n2@c.example"], ["n3@c.example", "n4@c.example"],
                   ["n5@c.example"], ["r2@b.example"]]
        sent.extend(await client_send(batches))
        await settle(t)

    config = ThrottleConfig(working_set_size=2, release_rate=20.0, threshold=50)
    _, receiver, events = run_mail(config, scenario)

    assert sent == [{}] * 8  # every recipient accepted at once: delayed, never refused
    decisions = [(type(e).__name__, e.dst) for e in events if isinstance(e, Passed | Queued)]
    # Recipients in the working set are never queued: the first three messages' (r2 in the last
    # one may have left the set of two by then, depending on how fast the n's went out).
    assert decisions[:4] == [("Passed", "r1@b.example"), ("Passed", "r2@b.example"),
                             ("Passed", "r1@b.example"), ("Passed", "r2@b.example")]
    queued = [e.dst for e in events if isinstance(e, Queued)]
    released = [e.dst for e in events if isinstance(e, Released)]
    new_passed = [e.dst for e in events if isinstance(e, Passed) and e.reason is PassReason.NEW]
    assert new_passed[:2] == ["r1@b.example", "r2@b.example"]
    assert len(queued) >= 3  # the client sends far faster than 20 new recipients a second
    assert released == queued  # every delayed recipient released, first queued first out
    assert not any(isinstance(e, Flagged) for e in events)
    # The receiving server got every recipient exactly once, the delayed ones in release order.
    got = [rc.lower() for rcpts, _ in receiver.got for rc in rcpts]
    assert sorted(got) == sorted(["r1@b.example", "r2@b.example", "r1@b.example",
                                  "r2@b.example", "n1@c.example", "n2@c.example",
                                  "n3@c.example", "n4@c.example", "n5@c.example",
                                  "r2@b.example"])
    # Delayed recipients arrive in release order (their last delivery: a recipient that passed
    # earlier, while still in the working set, was delivered then too).
    last = {rc: i for i, rc in enumerate(got)}
    assert sorted(queued, key=last.__getitem__) == queued
    # Content arrives intact.
    assert all(b"Subject: note" in body for _, body in receiver.got)


def test_mass_mailer_is_flagged_and_its_backlog_held() -> None:
    sent: list[Any] = []

    async def scenario(t: MailThrottle, r: Receiver, ev: list[Any]) -> None:
        batches = [[f"victim{i}@d.example"] for i in range(60)]
        sent.extend(await client_send(batches))
        await settle(t)

    config = ThrottleConfig(working_set_size=2, release_rate=20.0, threshold=10)
    throttle, receiver, events = run_mail(config, scenario)

    flags = [e for e in events if isinstance(e, Flagged)]
    assert len(flags) == 1 and flags[0].depth == 11
    refused = [i for i, s in enumerate(sent) if isinstance(s, smtplib.SMTPRecipientsRefused)]
    assert refused and refused == list(range(refused[0], 60))  # every message after the flag
    assert all(sent[i] == {} for i in range(refused[0]))
    held = {m.rcpt for m in throttle.held()}
    assert len(held) == 11
    got = {rc for rcpts, _ in receiver.got for rc in rcpts}
    assert not got & held
    released = [e.dst for e in events if isinstance(e, Released)]
    assert got == {e.dst for e in events if isinstance(e, Passed)} | set(released)
