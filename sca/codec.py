"""Canonical encoding of self-certifying alerts.

An alert is encoded as deterministic CBOR (RFC 8949 "core deterministic" as cbor2 writes it with
``canonical=True``: shortest integer and length heads, definite lengths, map keys sorted). The
top-level item is a map with exactly these six text keys::

    {
      "v":        1,                          # FORMAT_VERSION, unsigned int
      "service":  h'<32 bytes>',              # SHA-256 of the service binary
      "name":     "udp-echo",                 # 1..64 UTF-8 bytes, printable, informational only
      "type":     "execution-control",        # | "code-execution" | "function-argument"
      "messages": [[conn, h'..'], ...],       # 1..16 pairs, 64 KiB of message bytes in all
      "info":     {...}                       # exactly the keys of the alert's type, below
    }

``conn`` is ``null`` for a datagram or an unsigned connection number for a chunk of a TCP
connection. An alert is all datagrams or all connection chunks, never both, and connections are
numbered 0, 1, 2, ... in the order of their first chunk (so one exploit has one encoding).

A byte reference is the pair ``[message_index, offset]`` with ``offset < len(message)``. The info
map per type:

* ``execution-control``: ``{"target": [ref, ...]}``, 1..8 refs, least significant byte first.
* ``code-execution``: ``{"code": ref}``, the first byte of the injected code.
* ``function-argument``: ``{"call": "execve", "arg": n, "bytes": [ref, ...]}``, ``call`` one of
  ``CRITICAL_CALLS``, ``0 <= n <= 5`` (a syscall has six argument registers), 1..4096 refs in
  the argument's order.

No ref may appear twice in one list. Nothing else is allowed: no tags, floats, simple values
other than ``null``, indefinite lengths, extra keys or trailing bytes. ``decode_alert`` re-encodes
what it parsed and refuses anything that differs from the input, so ``encode(decode(x)) == x``
holds for every accepted ``x`` and the alert id (SHA-256 of the encoding) names one alert.

Every refusal raises ``AlertFormatError`` (a ``FormatError``, itself a ``ValueError``) with a
human-readable reason; no other exception escapes ``decode_alert``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NoReturn

import cbor2

from sca.alert import (
    CRITICAL_CALLS,
    FORMAT_VERSION,
    MAX_MESSAGES,
    MAX_SERVICE_NAME,
    MAX_TOTAL_BYTES,
    SERVICE_ID_LEN,
    Alert,
    AlertType,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
    Verification,
)

# An x86-64 control-transfer target is at most 8 bytes wide.
MAX_TARGET_BYTES = 8
# Refs of a function argument (an execve path or argv); bounds the work a hostile alert can ask.
MAX_ARGUMENT_REFS = 4096
# A syscall passes at most six arguments in registers.
MAX_ARGUMENT_INDEX = 5
# Largest valid encoding: 64 KiB of messages, 16 message heads, 4096 refs of at most 7 bytes
# each, and the fixed fields fit well under this. Checked before parsing anything.
MAX_ENCODED_BYTES = 128 * 1024
# Deepest valid nesting is map > array > array > item; anything deeper is refused by cbor2.
_MAX_DEPTH = 4

_TOP_KEYS = frozenset({"v", "service", "name", "type", "messages", "info"})
_INFO_KEYS = {
    AlertType.EXECUTION_CONTROL: frozenset({"target"}),
    AlertType.CODE_EXECUTION: frozenset({"code"}),
    AlertType.FUNCTION_ARGUMENT: frozenset({"call", "arg", "bytes"}),
}


class FormatError(ValueError):
    """Hostile or malformed input from outside: an alert, an envelope, a file. ``reason`` is the
    bare reason; ``str()`` says what was being read."""

    what = "input"

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid {self.what}: {reason}")
        self.reason = reason


class AlertFormatError(FormatError):
    """An alert encoding (or an Alert object given to ``encode_alert``) that is not valid."""

    what = "alert"


# --- strict CBOR loading, shared with sca.envelope ------------------------------------------


def _refuse_tag(tag: Any, immutable: bool = False) -> NoReturn:
    number = getattr(tag, "tag", None)
    raise _TagRefused(f"semantic tag {number} not allowed" if number is not None else "tag")


def _refuse_semantic(value: Any, immutable: bool = False) -> NoReturn:
    raise _TagRefused("semantic tag not allowed")


class _TagRefused(Exception):
    pass


# cbor2 decodes these tags itself and never shows them to tag_hook (found by trying every tag
# from 0 to 70,000 against cbor2 6.x; tests/sca/test_codec.py checks the whole range again).
# Overriding them with a refusing decoder makes every tag an error.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
                 1004, 43000, 55799)
_SEMANTIC_REFUSALS: dict[int, Callable[..., Any]] = dict.fromkeys(_BUILTIN_TAGS, _refuse_semantic)


def load_strict(data: Any, *, limit: int, error: type[FormatError]) -> Any:
    """Parse one CBOR item from ``data`` (bytes of at most ``limit``) or raise ``error``.

    Refuses tags, indefinite lengths, duplicate map keys and nesting deeper than the formats use.
    Trailing bytes are NOT detected here: callers re-encode and compare, which catches them."""
    if not isinstance(data, bytes):
        raise error(f"expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise error(f"too large: {len(data)} bytes, at most {limit}")
    if not data:
        raise error("empty input")
    try:
        return cbor2.loads(
            data,
            tag_hook=_refuse_tag,
            semantic_decoders=_SEMANTIC_REFUSALS,
            str_errors="strict",
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    # A hostile length head (a byte string or array "of 2**64 items") costs nothing: cbor2 6.x
    # reads in bounded chunks and fails at the end of the input, and the input is capped above.
    # cbor2's C decoder raises CBORDecodeError for most faults, but hostile input has also been
    # seen to surface ValueError, OverflowError, RecursionError and MemoryError; the contract is
    # that only ``error`` leaves this function, so catch everything that is an Exception.
    except Exception as exc:
        refused = _find_tag_refusal(exc)
        if refused is not None:
            raise error(str(refused)) from None
        raise error(f"CBOR: {_short(exc)}") from None


def _find_tag_refusal(exc: BaseException) -> _TagRefused | None:
    # cbor2 wraps a hook's exception (possibly several levels deep for nested items).
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 50:
        if isinstance(cur, _TagRefused):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def dump_in_order(obj: Any) -> bytes:
    """The deterministic encoding of ``obj``, whose maps are built in canonical key order
    (shorter keys first, then bytewise) and which holds no floats or sets: the bytes of
    ``cbor2.dumps(obj, canonical=True)`` at half the cost (canonical mode re-sorts every map,
    ~8 µs of a ~16 µs alert encoding, paid on every decode by its canonicality check).
    ``tests/sca`` compare the two."""
    return cbor2.dumps(obj)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(value: Any) -> str:
    """Name a decoded value's type for an error message (never its content: it is hostile)."""
    return {bool: "bool", int: "integer", bytes: "bytes", str: "text", list: "array",
            dict: "map", type(None): "null"}.get(type(value), type(value).__name__)


def check_map(obj: Any, keys: frozenset[str], where: str, error: type[FormatError]) -> dict:
    """``obj`` must be a map with exactly ``keys``."""
    if type(obj) is not dict:
        raise error(f"{where} must be a map, got {_kind(obj)}")
    present = set(obj)
    missing = keys - present
    if missing:
        raise error(f"{where}: missing field {sorted(missing)[0]!r}")
    extra = present - keys
    if extra:
        names = sorted(repr(k) if isinstance(k, str) else _kind(k) for k in extra)
        raise error(f"{where}: unknown field {names[0]}")
    return obj


def check_uint(value: Any, where: str, error: type[FormatError], limit: int | None = None) -> int:
    # bool is a subclass of int in Python; CBOR true/false must never pass as 1/0.
    if type(value) is not int:
        raise error(f"{where} must be an integer, got {_kind(value)}")
    if value < 0:
        raise error(f"{where} must not be negative")
    if limit is not None and value > limit:
        raise error(f"{where} is {value}, at most {limit}")
    return value


def check_bytes(value: Any, where: str, error: type[FormatError]) -> bytes:
    if type(value) is not bytes:
        raise error(f"{where} must be bytes, got {_kind(value)}")
    return value


def _fail(reason: str) -> NoReturn:
    raise AlertFormatError(reason)


# --- decode ---------------------------------------------------------------------------------


def decode_alert(data: bytes) -> Alert:
    """Parse and check an alert encoding; raise ``AlertFormatError`` for anything not valid."""
    raw = load_strict(data, limit=MAX_ENCODED_BYTES, error=AlertFormatError)
    alert = _alert_from_raw(raw)
    _check_semantics(alert)
    # Re-encoding is the canonicality check: non-minimal heads, unsorted keys and trailing
    # bytes all make the bytes differ. The reason tells trailing bytes apart.
    again = _encode_checked(alert)
    if again != data:
        if data.startswith(again):
            _fail(f"{len(data) - len(again)} trailing bytes after the alert")
        _fail("not the canonical encoding")
    return alert


def _alert_from_raw(raw: Any) -> Alert:
    top = check_map(raw, _TOP_KEYS, "alert", AlertFormatError)
    version = check_uint(top["v"], "version", AlertFormatError)
    if version != FORMAT_VERSION:
        _fail(f"unsupported version {version}, this node reads version {FORMAT_VERSION}")
    service_id = check_bytes(top["service"], "service id", AlertFormatError)
    name = top["name"]
    if type(name) is not str:
        _fail(f"service name must be text, got {_kind(name)}")
    kind = top["type"]
    if type(kind) is not str:
        _fail(f"type must be text, got {_kind(kind)}")
    try:
        alert_type = AlertType(kind)
    except ValueError:
        _fail(f"unknown alert type {kind[:40]!r}")
    messages = _messages_from_raw(top["messages"])
    verification = _info_from_raw(alert_type, top["info"])
    return Alert(service_id=service_id, service_name=name, messages=messages,
                 verification=verification, version=version)


def _messages_from_raw(raw: Any) -> tuple[Message, ...]:
    if type(raw) is not list:
        _fail(f"messages must be an array, got {_kind(raw)}")
    if len(raw) > MAX_MESSAGES:
        _fail(f"{len(raw)} messages, at most {MAX_MESSAGES}")
    out = []
    for i, item in enumerate(raw):
        if type(item) is not list or len(item) != 2:
            _fail(f"message {i} must be a [connection, bytes] pair")
        conn, data = item
        if conn is not None:
            conn = check_uint(conn, f"message {i} connection", AlertFormatError)
        out.append(Message(data=check_bytes(data, f"message {i} data", AlertFormatError),
                           connection=conn))
    return tuple(out)


def _ref_from_raw(raw: Any, where: str) -> ByteRef:
    if type(raw) is not list or len(raw) != 2:
        _fail(f"{where} must be a [message, offset] pair")
    message = check_uint(raw[0], f"{where} message", AlertFormatError)
    offset = check_uint(raw[1], f"{where} offset", AlertFormatError)
    return ByteRef(message=message, offset=offset)


def _refs_from_raw(raw: Any, where: str, limit: int) -> tuple[ByteRef, ...]:
    if type(raw) is not list:
        _fail(f"{where} must be an array, got {_kind(raw)}")
    # Check the count before touching the items: bounds the work of a hostile list.
    if len(raw) > limit:
        _fail(f"{where} has {len(raw)} refs, at most {limit}")
    out = []
    for i, r in enumerate(raw):
        # Fast path without building error strings; anything odd goes the slow, wordy way.
        if type(r) is list and len(r) == 2:
            message, offset = r
            if type(message) is int and type(offset) is int and message >= 0 and offset >= 0:
                out.append(ByteRef(message, offset))
                continue
        out.append(_ref_from_raw(r, f"{where}[{i}]"))
    return tuple(out)


def _info_from_raw(alert_type: AlertType, raw: Any) -> Verification:
    info = check_map(raw, _INFO_KEYS[alert_type], f"info of a {alert_type} alert",
                     AlertFormatError)
    if alert_type is AlertType.EXECUTION_CONTROL:
        return ExecutionControl(target=_refs_from_raw(info["target"], "target", MAX_TARGET_BYTES))
    if alert_type is AlertType.CODE_EXECUTION:
        return CodeExecution(code=_ref_from_raw(info["code"], "code"))
    call = info["call"]
    if type(call) is not str:
        _fail(f"call must be text, got {_kind(call)}")
    argument = check_uint(info["arg"], "argument", AlertFormatError)
    refs = _refs_from_raw(info["bytes"], "argument bytes", MAX_ARGUMENT_REFS)
    return FunctionArgument(call=call, argument=argument, bytes=refs)


# --- checks shared by encode and decode -----------------------------------------------------


def _check_semantics(alert: Alert) -> None:
    """Rules beyond the shapes: sizes, ranges, references, canonical connection numbering."""
    if alert.version != FORMAT_VERSION:
        _fail(f"unsupported version {alert.version}, this node reads version {FORMAT_VERSION}")
    if len(alert.service_id) != SERVICE_ID_LEN:
        _fail(f"service id must be {SERVICE_ID_LEN} bytes, got {len(alert.service_id)}")
    name = alert.service_name
    if not name:
        _fail("empty service name")
    if len(name.encode()) > MAX_SERVICE_NAME:
        _fail(f"service name longer than {MAX_SERVICE_NAME} bytes")
    # The name is shown on terminals and in logs: no control characters or odd separators.
    if not name.isprintable():
        _fail("service name has non-printable characters")
    _check_messages(alert.messages)
    _check_verification(alert.verification, alert.messages)


def _check_messages(messages: tuple[Message, ...]) -> None:
    if not messages:
        _fail("no messages")
    if len(messages) > MAX_MESSAGES:
        _fail(f"{len(messages)} messages, at most {MAX_MESSAGES}")
    total = sum(len(m.data) for m in messages)
    if total > MAX_TOTAL_BYTES:
        _fail(f"{total} bytes of messages, at most {MAX_TOTAL_BYTES}")
    datagrams = sum(m.connection is None for m in messages)
    if 0 < datagrams < len(messages):
        _fail("mixes datagrams and connection chunks")
    if datagrams:
        return
    # Connections are numbered in order of first appearance, so one exploit has one encoding.
    next_new = 0
    for i, m in enumerate(messages):
        assert m.connection is not None
        if m.connection > next_new:
            _fail(f"message {i} uses connection {m.connection} before connection {next_new}: "
                  "connections must be numbered 0, 1, 2, ... in order of first use")
        if m.connection == next_new:
            next_new += 1


def _check_refs(refs: tuple[ByteRef, ...], where: str, messages: tuple[Message, ...],
                limit: int) -> None:
    if not refs:
        _fail(f"{where} is empty")
    if len(refs) > limit:
        _fail(f"{where} has {len(refs)} refs, at most {limit}")
    if len(set(refs)) != len(refs):
        _fail(f"{where} names the same byte twice")
    sizes = [len(m.data) for m in messages]
    for ref in refs:
        if ref.message >= len(sizes):
            _fail(f"{where}: message {ref.message} does not exist ({len(sizes)} messages)")
        if ref.offset >= sizes[ref.message]:
            _fail(f"{where}: offset {ref.offset} is outside message {ref.message} "
                  f"({sizes[ref.message]} bytes)")


def _check_verification(v: Verification, messages: tuple[Message, ...]) -> None:
    if isinstance(v, ExecutionControl):
        _check_refs(v.target, "target", messages, MAX_TARGET_BYTES)
    elif isinstance(v, CodeExecution):
        _check_refs((v.code,), "code", messages, 1)
    else:
        if v.call not in CRITICAL_CALLS:
            _fail(f"unknown critical call {v.call[:40]!r} (known: {', '.join(CRITICAL_CALLS)})")
        if v.argument > MAX_ARGUMENT_INDEX:
            _fail(f"argument {v.argument} out of range 0..{MAX_ARGUMENT_INDEX}")
        _check_refs(v.bytes, "argument bytes", messages, MAX_ARGUMENT_REFS)


# --- encode ---------------------------------------------------------------------------------


def _check_types(alert: Any) -> None:
    """Python-side shape check of an Alert built by hand, so encode never writes junk."""

    def uint(value: Any, where: str) -> None:
        check_uint(value, where, AlertFormatError)

    if not isinstance(alert, Alert):
        _fail(f"expected an Alert, got {type(alert).__name__}")
    uint(alert.version, "version")
    check_bytes(alert.service_id, "service id", AlertFormatError)
    if type(alert.service_name) is not str:
        _fail("service name must be str")
    if type(alert.messages) is not tuple:
        _fail("messages must be a tuple")
    for i, m in enumerate(alert.messages):
        if not isinstance(m, Message):
            _fail(f"message {i} is not a Message")
        check_bytes(m.data, f"message {i} data", AlertFormatError)
        if m.connection is not None:
            uint(m.connection, f"message {i} connection")
    v = alert.verification
    if isinstance(v, ExecutionControl):
        refs: tuple[Any, ...] = v.target
    elif isinstance(v, CodeExecution):
        refs = (v.code,)
    elif isinstance(v, FunctionArgument):
        if type(v.call) is not str:
            _fail("call must be str")
        uint(v.argument, "argument")
        refs = v.bytes
    else:
        _fail(f"unknown verification info {type(v).__name__}")
    if type(refs) is not tuple:
        _fail("refs must be a tuple")
    for ref in refs:
        if not isinstance(ref, ByteRef):
            _fail("a ref is not a ByteRef")
        uint(ref.message, "ref message")
        uint(ref.offset, "ref offset")


def _ref_raw(ref: ByteRef) -> list[int]:
    return [ref.message, ref.offset]


def _encode_checked(alert: Alert) -> bytes:
    v = alert.verification
    info: dict[str, Any]
    # Every map in canonical key order (``dump_in_order``).
    if isinstance(v, ExecutionControl):
        info = {"target": [_ref_raw(r) for r in v.target]}
    elif isinstance(v, CodeExecution):
        info = {"code": _ref_raw(v.code)}
    else:
        info = {"arg": v.argument, "call": v.call, "bytes": [_ref_raw(r) for r in v.bytes]}
    return dump_in_order({
        "v": alert.version,
        "info": info,
        "name": alert.service_name,
        "type": str(v.type),
        "service": alert.service_id,
        "messages": [[m.connection, m.data] for m in alert.messages],
    })


def encode_alert(alert: Alert) -> bytes:
    """The canonical encoding of ``alert``; refuses (``AlertFormatError``) an alert that
    ``decode_alert`` would refuse, so every encoding this node writes can be read back."""
    _check_types(alert)
    _check_semantics(alert)
    return _encode_checked(alert)


def check_alert(alert: Alert) -> None:
    """Raise ``AlertFormatError`` unless ``alert`` is valid (what ``encode_alert`` checks)."""
    _check_types(alert)
    _check_semantics(alert)


# --- identity -------------------------------------------------------------------------------


def alert_id(alert_or_bytes: Alert | bytes) -> bytes:
    """SHA-256 of the canonical encoding. Bytes are checked with ``decode_alert`` first, so an
    id always names a valid alert (and a non-canonical spelling never gets an id of its own)."""
    if isinstance(alert_or_bytes, Alert):
        data = encode_alert(alert_or_bytes)
    else:
        decode_alert(alert_or_bytes)
        data = alert_or_bytes
    return hashlib.sha256(data).digest()


def alert_id_hex(alert_or_bytes: Alert | bytes) -> str:
    return alert_id(alert_or_bytes).hex()


def encoding_id_hex(data: bytes) -> str:
    """``alert_id_hex`` of bytes without ``decode_alert``'s check, for a caller that decodes them
    anyway (before it acts on the id): one parse instead of two on an alert's path."""
    return hashlib.sha256(data).hexdigest()
