"""What a taken-over connection does with its bytes: scrub, close or respond (sans-I/O).

A policy sees the client's bytes in order (first the message that triggered the takeover, then
whatever follows) and the server's, and answers with a :class:`Verdict`: bytes to forward to the
server, bytes to send the client, and whether to finish either side with a FIN. No policy ever
resets the server; the client sees a reset from none of them.

- ``Scrub``: drop the malicious message, pass the benign bytes before and after. Without a
  ``framer`` the malicious message is the trigger's bytes (what the triggering segment made
  deliverable), and a later chunk is dropped if ``matcher`` flags it. With a ``framer`` (messages
  delimited in the stream, e.g. lines) bytes are held until a frame is complete, and frames are
  dropped one by one: in the trigger, the frames ``matcher`` flags (all of them when none is
  flagged alone, including the rest of an unfinished one); later, every flagged frame.
- ``Close``: drop the malicious message and everything after it from the client; finish the
  client side with a FIN and the server side with a FIN once the bytes before the message are
  delivered (the server sees an ordinary end of stream, not a hung or reset connection).
- ``Respond``: like ``Close``, after sending the client a configured reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Matcher = Callable[[bytes], bool]
Framer = Callable[[bytes], int | None]  # length of the first complete frame in a buffer, or None

MAX_FRAME = 64 * 1024  # an alert's messages fit in 64 KiB, so a filter never needs more


@dataclass(slots=True)
class Verdict:
    forward: bytes = b""  # to the server
    reply: bytes = b""  # to the client
    close_client: bool = False  # FIN to the client after ``reply``; later client bytes dropped
    close_server: bool = False  # FIN to the server after ``forward``
    dropped: int = 0  # client bytes removed


def line_framer(delimiter: bytes = b"\n") -> Framer:
    """Frames that end with ``delimiter`` (line protocols: SMTP, HTTP headers, ...)."""

    def frame(buf: bytes) -> int | None:
        i = buf.find(delimiter)
        return None if i < 0 else i + len(delimiter)

    return frame


class Policy:
    """The base: pass everything (what a proxy does before any policy applies)."""

    name = "pass"

    def trigger(self, data: bytes) -> Verdict:
        return Verdict(forward=data)

    def client(self, data: bytes) -> Verdict:
        return Verdict(forward=data)

    def server(self, data: bytes) -> bytes:
        return data


@dataclass
class Scrub(Policy):
    matcher: Matcher | None = None
    framer: Framer | None = None
    max_frame: int = MAX_FRAME
    name = "scrub"
    _buf: bytes = field(default=b"", repr=False)
    _dropping: bool = field(default=False, repr=False)  # inside the malicious frame

    def trigger(self, data: bytes) -> Verdict:
        if self.framer is None:
            return Verdict(dropped=len(data))
        frames, tail = self._split(data)
        flagged = [self.matcher is not None and self.matcher(f) for f in frames]
        if any(flagged):
            v = Verdict(forward=b"".join(f for f, bad in zip(frames, flagged, strict=True)
                                         if not bad),
                        dropped=sum(len(f) for f, bad in zip(frames, flagged, strict=True)
                                    if bad))
            self._buf = tail
            return self._merge(v, self._overflow())
        # No single frame is the culprit: the message is the trigger's frames and the one it
        # leaves unfinished.
        self._dropping = bool(tail)
        return Verdict(dropped=len(data) - len(tail) + (len(tail) if tail else 0))

    def client(self, data: bytes) -> Verdict:
        if self.framer is None:
            if self.matcher is not None and self.matcher(data):
                return Verdict(dropped=len(data))
            return Verdict(forward=data)
        frames, tail = self._split(self._buf + data)
        v = Verdict()
        out = []
        for f in frames:
            if self._dropping:
                self._dropping = False
                v.dropped += len(f)
            elif self.matcher is not None and self.matcher(f):
                v.dropped += len(f)
            else:
                out.append(f)
        v.forward = b"".join(out)
        self._buf = tail
        return self._merge(v, self._overflow())

    def _split(self, buf: bytes) -> tuple[list[bytes], bytes]:
        assert self.framer is not None
        frames = []
        while buf:
            n = self.framer(buf)
            if n is None or n <= 0:
                break
            frames.append(buf[:n])
            buf = buf[n:]
        return frames, buf

    def _overflow(self) -> Verdict:
        """A frame longer than any filter looks at: stop holding it (drop it if it is the
        malicious one, else let it through: holding it longer gains nothing)."""
        if len(self._buf) <= self.max_frame:
            return Verdict()
        buf, self._buf = self._buf, b""
        if self._dropping:
            return Verdict(dropped=len(buf))
        return Verdict(forward=buf)

    @staticmethod
    def _merge(a: Verdict, b: Verdict) -> Verdict:
        return Verdict(a.forward + b.forward, a.reply + b.reply, a.close_client or b.close_client,
                       a.close_server or b.close_server, a.dropped + b.dropped)


@dataclass
class Close(Policy):
    name = "close"

    def trigger(self, data: bytes) -> Verdict:
        return Verdict(close_client=True, close_server=True, dropped=len(data))

    def client(self, data: bytes) -> Verdict:
        return Verdict(dropped=len(data))

    def server(self, data: bytes) -> bytes:
        return b""


@dataclass
class Respond(Close):
    reply: bytes = b""
    name = "respond"

    def trigger(self, data: bytes) -> Verdict:
        return Verdict(reply=self.reply, close_client=True, close_server=True,
                       dropped=len(data))


POLICIES = ("scrub", "close", "respond")


def make_policy(name: str, *, reply: bytes = b"", matcher: Matcher | None = None,
                framer: Framer | None = None) -> Policy:
    """A fresh policy object (each taken-over connection needs its own: scrub holds state)."""
    if name == "scrub":
        return Scrub(matcher, framer)
    if name == "close":
        return Close()
    if name == "respond":
        return Respond(reply=reply)
    raise ValueError(f"unknown takeover policy {name!r} (one of {', '.join(POLICIES)})")
