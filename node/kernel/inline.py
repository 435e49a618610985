"""The user-level stack inline on NFQUEUE: every queued packet goes through ``Stack.handle``
and gets its verdict at once, drop if the stack advises it (``Drop``), else accept.

The packet bytes the binding hands over are passed to the stack as they are (no copy into a
pool buffer: that would add one); the stack's views point into them and whatever it keeps
(reassembly, messages) it copies. Checksums are left to the kernel (see ``node.stack.stack``),
so the stack runs with ``verify_checksums=False`` unless told otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from node.kernel.marks import Q_STACK
from node.kernel.nfqueue import Handle, QueueAdapter
from node.stack.events import Drop, Event
from node.stack.stack import Stack

OnEvents = Callable[[list[Event]], None]


class StackQueue:
    def __init__(self, stack: Stack, on_events: OnEvents | None = None, *,
                 queue_num: int = Q_STACK, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, fail_open: bool = True,
                 max_len: int = 1024) -> None:
        self.stack = stack
        self.on_events = on_events
        self.dropped = 0
        self._loop = loop
        self.queue = QueueAdapter(queue_num, self._on_packet, netns=netns, loop=loop,
                                  fail_open=fail_open, max_len=max_len)

    def start(self) -> StackQueue:
        self.queue.start()
        self._loop = self.queue._loop
        return self

    def close(self) -> None:
        self.queue.close()

    async def __aenter__(self) -> StackQueue:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        events = self.stack.handle(payload, self._loop.time())  # type: ignore[union-attr]
        if events and any(type(e) is Drop for e in events):
            self.dropped += 1
            handle.drop()
        else:
            handle.accept()
        if events and self.on_events is not None:
            self.on_events(events)
