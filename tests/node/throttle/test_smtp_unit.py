"""The e-mail throttle's relay logic, driven through its aiosmtpd hooks with a fake next hop
(no sockets; the real SMTP client and server run in test_smtp_netns.py)."""

from __future__ import annotations

import asyncio
import smtplib

from aiosmtpd.smtp import Envelope, Session

from node.throttle import Flagged, Passed, Queued, Released, ThrottleConfig, ThrottleCore
from node.throttle.smtp import MAX_RECIPIENTS, MailThrottle, recipient_key


class FakeHop:
    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []
        self.fail_first = fail_first

    async def __call__(self, mail_from: str, rcpts: list[str], content: bytes) -> None:
        if self.fail_first:
            self.fail_first -= 1
            raise smtplib.SMTPServerDisconnected("gone")
        self.got.append((mail_from, rcpts, content))


async def send(t: MailThrottle, peer: str, rcpts: list[str], body: bytes = b"hi") -> list[str]:
    """One SMTP transaction through the hooks; the replies to each RCPT then to DATA."""
    session = Session(asyncio.get_running_loop())
    session.peer = (peer, 40000)
    env = Envelope()
    env.mail_from = "alice@a.example"
    replies = [await t.handler.handle_RCPT(None, session, env, r, []) for r in rcpts]
    if env.rcpt_tos:
        env.original_content = env.content = body
        replies.append(await t.handler.handle_DATA(None, session, env))
    return replies


def make(config: ThrottleConfig, hop: FakeHop) -> tuple[MailThrottle, list]:
    events: list = []
    t = MailThrottle(ThrottleCore(config), hop, on_event=events.append, retry_delay=0.01)
    t.attach()
    return t, events


def test_recipient_key_folds_case() -> None:
    assert recipient_key(" Bob@B.Example ") == "bob@b.example"


def test_known_recipients_go_at_once_new_ones_later_in_order() -> None:
    async def main() -> None:
        hop = FakeHop()
        t, events = make(ThrottleConfig(working_set_size=2, release_rate=50.0), hop)
        assert (await send(t, "10.77.0.1", ["a@x", "b@x"]))[-1].startswith("250")
        await send(t, "10.77.0.1", ["A@x"])  # same recipient, other case: working set
        replies = await send(t, "10.77.0.1", [f"n{i}@y" for i in range(5)], b"news")
        assert all(r.startswith("250") for r in replies)  # delayed, never refused
        await t.drain()
        queued = [e.dst for e in events if isinstance(e, Queued)]
        assert queued == [f"n{i}@y" for i in range(1, 5)]  # n0 took the free slot
        while len([e for e in events if isinstance(e, Released)]) < 4:
            await asyncio.sleep(0.01)
        await t.drain()
        assert [e.dst for e in events if isinstance(e, Released)] == queued
        assert [g[1] for g in hop.got] == [["a@x", "b@x"], ["A@x"], ["n0@y"], ["n1@y"],
                                           ["n2@y"], ["n3@y"], ["n4@y"]]
        assert all(g[2] == b"news" for g in hop.got[2:])
        assert t.delivered[-1] == (3, ["n4@y"])
        await t.close()

    asyncio.run(main())


def test_mass_mailer_is_flagged_held_refused_then_cleared() -> None:
    async def main() -> None:
        hop = FakeHop()
        t, events = make(ThrottleConfig(working_set_size=2, release_rate=20.0, threshold=5),
                         hop)
        await send(t, "10.77.0.9", ["a@x", "b@x"])
        replies = await send(t, "10.77.0.9", [f"m{i}@y" for i in range(20)])
        assert replies[-1].startswith("250")
        flags = [e for e in events if isinstance(e, Flagged)]
        assert len(flags) == 1 and flags[0].src == "10.77.0.9"
        assert flags[0].depth == 6  # the queue past the threshold ...
        # ... is held for the operator, and so are the recipients after the flag.
        assert [m.rcpt for m in t.held("10.77.0.9")] == [f"m{i}@y" for i in range(1, 20)]
        # Further mail from the flagged source is refused for now (the client keeps it) ...
        replies = await send(t, "10.77.0.9", ["z@y"])
        assert replies == ["451 4.7.1 Outgoing mail held: mass mailing suspected, "
                           "operator notified"]
        # ... while another source is unaffected.
        assert (await send(t, "10.77.0.8", ["z@y"]))[-1].startswith("250")
        t.clear("10.77.0.9")
        assert (await send(t, "10.77.0.9", ["b@x"]))[-1].startswith("250")  # working set
        assert t.discard_held("10.77.0.9") == 19 and t.held() == []
        await t.drain()
        assert [g[1] for g in hop.got] == [["a@x", "b@x"], ["m0@y"], ["z@y"], ["b@x"]]
        await t.close()

    asyncio.run(main())


def test_release_held_delivers_past_the_throttle() -> None:
    async def main() -> None:
        hop = FakeHop()
        t, _ = make(ThrottleConfig(working_set_size=1, threshold=2), hop)
        await send(t, "s", ["a@x"])
        await send(t, "s", [f"m{i}@y" for i in range(4)])
        assert len(t.held("s")) == 3
        assert t.release_held("s") == 3
        await t.drain()
        assert [g[1] for g in hop.got][-3:] == [["m1@y"], ["m2@y"], ["m3@y"]]
        await t.close()

    asyncio.run(main())


def test_allowlisted_recipient_passes_even_when_flagged() -> None:
    async def main() -> None:
        hop = FakeHop()
        core = ThrottleCore(ThrottleConfig(working_set_size=1, threshold=1),
                            allowlist={"helpdesk@corp"})
        t = MailThrottle(core, hop)
        t.attach()
        await send(t, "s", ["a@x", "b@x", "c@x", "d@x"])
        assert core.is_infected("s")
        assert (await send(t, "s", ["HelpDesk@corp"]))[-1].startswith("250")
        await t.drain()
        assert hop.got[-1][1] == ["HelpDesk@corp"]
        await t.close()

    asyncio.run(main())


def test_failed_hop_is_retried_then_recorded() -> None:
    async def main() -> None:
        hop = FakeHop(fail_first=1)
        t, events = make(ThrottleConfig(), hop)
        await send(t, "s", ["a@x"])
        await t.drain()
        assert [g[1] for g in hop.got] == [["a@x"]] and not t.failed
        hop.fail_first = 10
        await send(t, "s", ["b@x"])
        await t.drain()
        assert [m.rcpt for m, _ in t.failed] == ["b@x"]
        assert any(isinstance(e, Passed) for e in events)
        await t.close()

    asyncio.run(main())


def test_too_many_recipients_per_message() -> None:
    async def main() -> None:
        t, _ = make(ThrottleConfig(threshold=None), FakeHop())
        replies = await send(t, "s", [f"r{i}@x" for i in range(MAX_RECIPIENTS + 1)])
        assert replies[MAX_RECIPIENTS].startswith("452")
        await t.close()

    asyncio.run(main())
