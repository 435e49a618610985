"""A bounded pool of preallocated packet buffers (seed 003's memory pool).

A packet is read (``recv_into``) or copied once into a buffer taken from the pool, and the
layers above get ``memoryview`` slices of it, never copies; the reader releases the buffer when
the packet is done with (verdict given, stack finished). When all buffers are out, ``acquire``
returns ``None`` and the caller decides (the passive reader counts a drop; an inline adapter can
still hand the stack the kernel's own bytes). The pool never grows.
"""

from __future__ import annotations

from collections.abc import Callable


class PoolExhausted(RuntimeError):
    """No free buffer (only from ``acquire_or_raise``)."""


class Buffer:
    """One pool buffer: ``data`` is its fixed bytearray, ``length`` the bytes in use."""

    __slots__ = ("_mv", "_pool", "data", "in_use", "length")

    def __init__(self, pool: BufferPool, size: int) -> None:
        self._pool = pool
        self.data = bytearray(size)
        self._mv = memoryview(self.data)
        self.length = 0
        self.in_use = False

    @property
    def view(self) -> memoryview:
        """The packet bytes, as a view of the buffer (valid until ``release``)."""
        return self._mv[: self.length]

    @property
    def capacity(self) -> int:
        return len(self.data)

    def fill(self, packet: bytes | bytearray | memoryview) -> memoryview:
        """Copy ``packet`` in (truncated to the capacity); return the view."""
        n = min(len(packet), len(self.data))
        self._mv[:n] = memoryview(packet)[:n]
        self.length = n
        return self._mv[:n]

    def recv_into(self, recv: Callable[[memoryview], int]) -> memoryview:
        """Let ``recv`` (e.g. ``sock.recv_into``) write straight into the buffer."""
        self.length = recv(self._mv)
        return self._mv[: self.length]

    def release(self) -> None:
        self._pool.release(self)


class BufferPool:
    """``count`` buffers of ``size`` bytes each, allocated once."""

    def __init__(self, count: int = 1024, size: int = 2048) -> None:
        if count < 1 or size < 64:
            raise ValueError("a pool needs at least one buffer of 64 bytes")
        self.size = size
        self._all = [Buffer(self, size) for _ in range(count)]
        self._free = list(self._all)
        self.exhausted = 0  # acquire() calls that found no buffer

    def __len__(self) -> int:
        return len(self._all)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> Buffer | None:
        if not self._free:
            self.exhausted += 1
            return None
        buf = self._free.pop()
        buf.in_use = True
        buf.length = 0
        return buf

    def acquire_or_raise(self) -> Buffer:
        buf = self.acquire()
        if buf is None:
            raise PoolExhausted(f"all {len(self._all)} packet buffers are in use")
        return buf

    def release(self, buf: Buffer) -> None:
        if buf._pool is not self:
            raise ValueError("buffer belongs to another pool")
        if not buf.in_use:
            raise ValueError("buffer released twice")
        buf.in_use = False
        self._free.append(buf)
