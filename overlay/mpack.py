"""A strict, small msgpack codec for the Kademlia RPC frames, by hand with struct.

rpcudp frames its payloads with u-msgpack, a pure-Python codec that took about 40% of all CPU
time when a thousand nodes joined in one process, and that decodes whatever a hostile peer
sends (maps, floats, extension types, deep nesting) before anyone looks at it. The RPCs use only
nil, booleans, integers, byte strings, text strings and arrays, at most three levels deep, so
this codec reads exactly those (the same bytes u-msgpack writes for them) and refuses the rest
with ``MpackError`` before building anything big: a length head that runs past the end of the
input fails at once.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_DEPTH = 4


class MpackError(ValueError):
    pass


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")


def _port(port: int) -> bytes:
    if port < 0x80:
        return bytes((port,))
    if port <= 0xFF:
        return b"\xcc" + bytes((port,))
    return b"\xcd" + _U16.pack(port)


def _pack(obj: Any, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise MpackError("too deep")
    t = type(obj)
    if (t is tuple or t is list) and len(obj) == 3:
        # Fast path for the contact triple [20-byte id, IP text, port] that find_node replies
        # carry twenty of: the bulk of all RPC bytes (same encoding as the general path).
        node_id, ip, port = obj
        if (type(node_id) is bytes and len(node_id) == 20 and type(ip) is str
                and len(ip) < 32 and ip.isascii() and type(port) is int and 0 <= port <= 0xFFFF):
            out.append(b"\x93\xc4\x14" + node_id + bytes((0xA0 | len(ip),)) + ip.encode()
                       + _port(port))
            return
    if obj is None:
        out.append(b"\xc0")
    elif obj is True:
        out.append(b"\xc3")
    elif obj is False:
        out.append(b"\xc2")
    elif type(obj) is int:
        if 0 <= obj < 0x80:
            out.append(bytes((obj,)))
        elif -32 <= obj < 0:
            out.append(bytes((obj & 0xFF,)))
        elif 0 <= obj <= 0xFF:
            out.append(b"\xcc" + bytes((obj,)))
        elif 0 <= obj <= 0xFFFF:
            out.append(b"\xcd" + _U16.pack(obj))
        elif 0 <= obj <= 0xFFFFFFFF:
            out.append(b"\xce" + _U32.pack(obj))
        elif 0 <= obj <= 0xFFFFFFFFFFFFFFFF:
            out.append(b"\xcf" + _U64.pack(obj))
        elif -0x80 <= obj < 0:
            out.append(b"\xd0" + _I8.pack(obj))
        elif -0x8000 <= obj < 0:
            out.append(b"\xd1" + _I16.pack(obj))
        elif -0x80000000 <= obj < 0:
            out.append(b"\xd2" + _I32.pack(obj))
        elif -0x8000000000000000 <= obj < 0:
            out.append(b"\xd3" + _I64.pack(obj))
        else:
            raise MpackError("integer out of range")
    elif type(obj) is bytes:
        n = len(obj)
        if n <= 0xFF:
            out.append(b"\xc4" + bytes((n,)))
        elif n <= 0xFFFF:
            out.append(b"\xc5" + _U16.pack(n))
        else:
            out.append(b"\xc6" + _U32.pack(n))
        out.append(obj)
    elif type(obj) is str:
        data = obj.encode("utf-8")
        n = len(data)
        if n < 32:
            out.append(bytes((0xA0 | n,)))
        elif n <= 0xFF:
            out.append(b"\xd9" + bytes((n,)))
        elif n <= 0xFFFF:
            out.append(b"\xda" + _U16.pack(n))
        else:
            out.append(b"\xdb" + _U32.pack(n))
        out.append(data)
    elif type(obj) in (list, tuple):
        if depth + 1 > MAX_DEPTH:  # the same limit the decoder applies
            raise MpackError("too deep")
        n = len(obj)
        if n < 16:
            out.append(bytes((0x90 | n,)))
        elif n <= 0xFFFF:
            out.append(b"\xdc" + _U16.pack(n))
        else:
            out.append(b"\xdd" + _U32.pack(n))
        for item in obj:
            _pack(item, out, depth + 1)
    else:
        raise MpackError(f"cannot pack {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    out: list[bytes] = []
    _pack(obj, out, 0)
    return b"".join(out)


def _take(data: bytes, pos: int, n: int) -> int:
    end = pos + n
    if end > len(data):
        raise MpackError("truncated")
    return end


def _unpack(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if pos >= len(data):
        raise MpackError("truncated")
    b = data[pos]
    pos += 1
    if b < 0x80:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF:
        return _text(data, pos, b & 0x1F)
    if 0x90 <= b <= 0x9F:
        return _array(data, pos, b & 0x0F, depth)
    if b == 0xC0:
        return None, pos
    if b == 0xC2:
        return False, pos
    if b == 0xC3:
        return True, pos
    if b in (0xC4, 0xC5, 0xC6):
        size = (1, 2, 4)[b - 0xC4]
        end = _take(data, pos, size)
        n = int.from_bytes(data[pos:end], "big")
        stop = _take(data, end, n)
        return data[end:stop], stop
    if b in (0xD9, 0xDA, 0xDB):
        size = (1, 2, 4)[b - 0xD9]
        end = _take(data, pos, size)
        return _text(data, end, int.from_bytes(data[pos:end], "big"))
    if b in (0xDC, 0xDD):
        size = 2 if b == 0xDC else 4
        end = _take(data, pos, size)
        return _array(data, end, int.from_bytes(data[pos:end], "big"), depth)
    if 0xCC <= b <= 0xCF:
        size = 1 << (b - 0xCC)
        end = _take(data, pos, size)
        return int.from_bytes(data[pos:end], "big"), end
    if 0xD0 <= b <= 0xD3:
        size = 1 << (b - 0xD0)
        end = _take(data, pos, size)
        return int.from_bytes(data[pos:end], "big", signed=True), end
    raise MpackError(f"type byte {b:#04x} not allowed")


def _text(data: bytes, pos: int, n: int) -> tuple[str, int]:
    end = _take(data, pos, n)
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise MpackError("invalid UTF-8") from None


def _triple(data: bytes, pos: int) -> tuple[list[Any], int] | None:
    """Fast path for a contact triple at ``pos`` (just past its 0x93 head), or None to let the
    general decoder handle whatever it is."""
    if data[pos:pos + 2] != b"\xc4\x14":
        return None
    ip_at = pos + 22
    if ip_at >= len(data) or not 0xA0 <= data[ip_at] <= 0xBF:
        return None
    ip_end = ip_at + 1 + (data[ip_at] & 0x1F)
    if ip_end >= len(data):
        return None
    b = data[ip_end]
    if b < 0x80:
        port, end = b, ip_end + 1
    elif b == 0xCD and ip_end + 3 <= len(data):
        port, end = _U16.unpack_from(data, ip_end + 1)[0], ip_end + 3
    else:
        return None
    try:
        ip = data[ip_at + 1:ip_end].decode("ascii")
    except UnicodeDecodeError:
        return None
    return [data[pos + 2:ip_at], ip, port], end


def _array(data: bytes, pos: int, n: int, depth: int) -> tuple[list[Any], int]:
    if depth + 1 > MAX_DEPTH:
        raise MpackError("too deep")
    if n > len(data) - pos:  # every item takes at least one byte
        raise MpackError("array longer than the input")
    items = []
    for _ in range(n):
        if pos < len(data) and data[pos] == 0x93 and depth + 2 <= MAX_DEPTH:
            fast = _triple(data, pos + 1)
            if fast is not None:
                items.append(fast[0])
                pos = fast[1]
                continue
        item, pos = _unpack(data, pos, depth + 1)
        items.append(item)
    return items, pos


def unpackb(data: bytes) -> Any:
    """One object that fills ``data`` exactly, or ``MpackError``."""
    obj, pos = _unpack(data, 0, 0)
    if pos != len(data):
        raise MpackError("trailing bytes")
    return obj
