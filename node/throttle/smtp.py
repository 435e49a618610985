"""The e-mail throttle: the throttle core on SMTP recipients, in an SMTP relay (aiosmtpd).

The host's outgoing mail goes through this relay. Per source (the client's address, by
default), a working set of recent recipients; a recipient in the set is relayed at once, a new
one waits in the delay queue, which lets one new recipient out per interval. Mail is delayed,
not refused: the client gets ``250`` and the relay delivers later, in release order, to the next
hop. A delay queue that grows past the threshold flags the source as a mass mailer: its backlog is
held for the operator (``held``, ``release_held``, ``discard_held``), and its further recipients
get a temporary ``451`` (the client keeps the mail) until the operator clears the flag.

Deliveries go through one worker in order, so what the core released first reaches the next hop
first. The queue lives in memory: mail accepted but not yet delivered is lost if the node stops
(no spool yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import smtplib
import socket
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from node.throttle.core import ThrottleCore
from node.throttle.driver import CoreDriver
from node.throttle.events import Blocked, Event, Flagged, Passed, Released

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
MAX_RECIPIENTS = 100  # per message, as common MTAs do; a bigger list must come as several
MAX_HELD = 10_000  # messages held for the operator, over all sources; oldest dropped past it


@dataclass(frozen=True, slots=True)
class OutMail:
    """One recipient's copy of a message: the core's flow handle and the unit of delivery."""

    id: int  # message number; copies of one message share it
    src: Hashable
    mail_from: str
    rcpt: str
    content: bytes


# forward(mail_from, recipients, content) delivers one message to the next hop; raises on failure.
Forward = Callable[[str, list[str], bytes], Awaitable[None]]


def recipient_key(address: str) -> str:
    """What the working set holds for a recipient: case folded, so ``A@x`` and ``a@x`` are one."""
    return address.strip().lower()


def source_of_peer(session: Session, envelope: Envelope) -> Hashable:
    """The throttle's source for a message: the address the client connected from."""
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else str(peer)


class SmtpForward:
    """Deliver to a next-hop SMTP server with smtplib, in a worker thread.

    ``socket_setup`` is applied to the outgoing socket before it connects (the node uses it to put
    its SO_MARK on the socket, so its own relayed mail is not throttled a second time by the
    connection throttle)."""

    def __init__(self, host: str, port: int = 25, *, timeout: float = 30.0,
                 local_hostname: str | None = None,
                 socket_setup: Callable[[socket.socket], None] | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.local_hostname = local_hostname
        self.socket_setup = socket_setup

    def _send(self, mail_from: str, rcpts: list[str], content: bytes) -> None:
        setup = self.socket_setup

        class _Client(smtplib.SMTP):
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                     socket.SOCK_STREAM)
                try:
                    if setup is not None:
                        setup(sock)
                    sock.settimeout(timeout)
                    sock.connect((host, port))
                except BaseException:
                    sock.close()
                    raise
                return sock

        with _Client(self.host, self.port, timeout=self.timeout,
                     local_hostname=self.local_hostname) as client:
            refused = client.sendmail(mail_from, rcpts, content)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    async def __call__(self, mail_from: str, rcpts: list[str], content: bytes) -> None:
        await asyncio.to_thread(self._send, mail_from, rcpts, content)


class _Handler:
    """aiosmtpd hooks (aiosmtpd takes every ``handle_*`` attribute of the handler as a hook, so
    they live apart from the throttle's own methods)."""

    def __init__(self, throttle: MailThrottle) -> None:
        self._t = throttle

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        return self._t._on_rcpt(session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self._t._on_data(session, envelope)


class MailThrottle:
    """The relay. Start it with ``start()`` inside a running event loop."""

    def __init__(self, core: ThrottleCore, forward: Forward, *,
                 on_event: Callable[[Event], None] | None = None,
                 source_of: Callable[[Session, Envelope], Hashable] = source_of_peer,
                 retries: int = 3, retry_delay: float = 0.5,
                 hostname: str = "herdwall-relay") -> None:
        self.core = core
        self.forward = forward
        self.on_event = on_event
        self.source_of = source_of
        self.retries, self.retry_delay = retries, retry_delay
        self.hostname = hostname
        self.delivered: list[tuple[int, list[str]]] = []  # (message id, recipients), in order
        self.failed: list[tuple[OutMail, str]] = []
        self._held: dict[Hashable, list[OutMail]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[list[OutMail]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._driver: CoreDriver | None = None
        self.handler = _Handler(self)  # the aiosmtpd handler (for a server made elsewhere)

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 8025, *,
                    sock: socket.socket | None = None) -> asyncio.Server:
        """Listen for the host's outgoing mail (on ``sock`` if given, else host:port)."""
        self.attach()
        assert self._loop is not None
        handler = self.handler

        def factory() -> SMTP:
            return SMTP(handler, hostname=self.hostname, data_size_limit=MAX_MESSAGE_BYTES,
                        timeout=60)

        if sock is not None:
            self._server = await self._loop.create_server(factory, sock=sock)
        else:
            self._server = await self._loop.create_server(factory, host, port)
        return self._server

    def attach(self) -> None:
        """Bind to the running loop and start the delivery worker (``start`` does it)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._driver = CoreDriver(self.core, self._loop, self._apply, self.on_event)
            self._outbox = asyncio.Queue()
            self._worker = self._loop.create_task(self._deliver_loop())

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def drain(self) -> None:
        """Wait until every delivery handed to the worker so far is done (tests, shutdown)."""
        assert self._outbox is not None
        await self._outbox.join()

    # -- operator -----------------------------------------------------------------------------

    def clear(self, src: Hashable) -> list[Event]:
        """Clear the mass-mailer flag; held mail stays held until released or discarded."""
        assert self._driver is not None
        return self._driver.clear(src)

    def held(self, src: Hashable | None = None) -> list[OutMail]:
        if src is not None:
            return list(self._held.get(src, []))
        return [m for mails in self._held.values() for m in mails]

    def release_held(self, src: Hashable) -> int:
        """Operator: the held mail is legitimate; deliver it now (past the throttle)."""
        mails = self._held.pop(src, [])
        for m in mails:
            self._enqueue([m])
        return len(mails)

    def discard_held(self, src: Hashable) -> int:
        return len(self._held.pop(src, []))

    # -- SMTP ---------------------------------------------------------------------------------

    def _on_rcpt(self, session: Session, envelope: Envelope, address: str,
                 options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        src = self.source_of(session, envelope)
        if self.core.is_infected(src) and recipient_key(address) not in self.core.allowlist:
            # Temporary: the client keeps the mail, and nothing is lost if the flag was wrong.
            return "451 4.7.1 Outgoing mail held: mass mailing suspected, operator notified"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    def _on_data(self, session: Session, envelope: Envelope) -> str:
        assert self._driver is not None
        src = self.source_of(session, envelope)
        content = envelope.original_content or b""
        mail_id = next(self._ids)
        mail_from = envelope.mail_from or ""
        self._driver.attempts([
            (src, recipient_key(rcpt), OutMail(mail_id, src, mail_from, rcpt, content))
            for rcpt in envelope.rcpt_tos])
        return f"250 2.0.0 OK: queued as {mail_id}"

    # -- events -------------------------------------------------------------------------------

    def _apply(self, events: list[Event]) -> None:
        # Recipients of one message that pass together go in one delivery.
        passed: dict[int, list[OutMail]] = {}
        for e in events:
            if isinstance(e, Passed):
                if isinstance(e.flow, OutMail):
                    passed.setdefault(e.flow.id, []).append(e.flow)
            elif isinstance(e, Released):
                self._flush(passed)
                if isinstance(e.flow, OutMail):
                    self._enqueue([e.flow])
            elif isinstance(e, Blocked):
                if isinstance(e.flow, OutMail):
                    self._hold(e.flow)
            elif isinstance(e, Flagged):
                log.warning("mass mailing suspected from %s: %d recipients waiting; outgoing "
                            "mail held", e.src, e.depth)
        self._flush(passed)

    def _flush(self, passed: dict[int, list[OutMail]]) -> None:
        for mails in passed.values():
            self._enqueue(mails)
        passed.clear()

    def _hold(self, mail: OutMail) -> None:
        self._held.setdefault(mail.src, []).append(mail)
        if sum(map(len, self._held.values())) > MAX_HELD:
            oldest = min(self._held, key=lambda s: self._held[s][0].id)
            dropped = self._held[oldest].pop(0)
            if not self._held[oldest]:
                del self._held[oldest]
            log.warning("held mail over %d: dropped message %d to %s", MAX_HELD, dropped.id,
                        dropped.rcpt)

    # -- delivery -----------------------------------------------------------------------------

    def _enqueue(self, mails: list[OutMail]) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(mails)

    async def _deliver_loop(self) -> None:
        assert self._outbox is not None
        while True:
            mails = await self._outbox.get()
            try:
                await self._deliver(mails)
            finally:
                self._outbox.task_done()

    async def _deliver(self, mails: list[OutMail]) -> None:
        first = mails[0]
        rcpts = [m.rcpt for m in mails]
        error = ""
        for attempt in range(self.retries):
            try:
                await self.forward(first.mail_from, rcpts, first.content)
            except (OSError, smtplib.SMTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("delivery of message %d to %s failed (%s), attempt %d", first.id,
                            rcpts, error, attempt + 1)
                await asyncio.sleep(self.retry_delay * 2 ** attempt)
            else:
                self.delivered.append((first.id, rcpts))
                return
        self.failed.extend((m, error) for m in mails)

    def stats(self) -> dict[str, Any]:
        return {"delivered": len(self.delivered), "failed": len(self.failed),
                "held": sum(map(len, self._held.values()))}
