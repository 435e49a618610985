"""The Internet checksum (RFC 1071) without a Python loop over words.

The ones'-complement sum of 16-bit big-endian words is congruent to the whole buffer read as one
big-endian integer modulo 0xFFFF (because 2**16 ≡ 1 mod 0xFFFF), and CPython does both
``int.from_bytes`` and the modulo by a one-digit divisor in C: about 4 µs for 1,480 bytes here,
against 20 µs for summing an ``array('H')``. Headers (20 bytes) cost well under a microsecond.
"""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """The ones'-complement sum of ``data`` (zero-padded to even length), plus ``initial``,
    reduced modulo 0xFFFF (so 0xFFFF itself appears as 0)."""
    value = int.from_bytes(data, "big")
    if len(memoryview(data)) & 1:
        value <<= 8
    return (value + initial) % 0xFFFF


def checksum(data: Buffer, initial: int = 0) -> int:
    """The checksum field value for ``data`` (with its checksum field zeroed) plus a partial
    sum ``initial`` (e.g. the pseudo-header's ``ones_sum``)."""
    s = ones_sum(data, initial)
    # A ones'-complement sum is 0 only for all-zero input; a congruent 0 otherwise means 0xFFFF.
    if s == 0 and (initial or any(memoryview(data).cast("B"))):
        s = 0xFFFF
    return ~s & 0xFFFF


def verify(data: Buffer, initial: int = 0) -> bool:
    """True if ``data`` (checksum field included) plus ``initial`` sums to 0xFFFF."""
    return ones_sum(data, initial) == 0


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv4 (4-byte addresses) or IPv6 (16-byte) pseudo-header."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length) % 0xFFFF
