"""Signed envelopes: an encoded alert plus who signed it and when.

Encoding: deterministic CBOR (as in ``sca.codec``), a map with exactly these text keys::

    {"v": 1, "alert": h'<canonical alert>', "key": h'<32-byte Ed25519 public key>',
     "t": <signing time, unix milliseconds, unsigned int>, "sig": h'<64-byte signature>'}

The signature is Ed25519 over::

    b"herdwall-sca-envelope-v1\\0" || u32be(len(alert)) || alert || u64be(t)

The context string keeps these signatures from being replayed as any other herdwall signature,
and the length prefix makes the split between alert and time unambiguous.

A good signature says which node sent the alert (node id = SHA-256(key)[:20]) and when it says
it did so. It never says the alert is true: only re-running the alert in one's own sandbox
(``sca.verify``) does that. A node signs only alerts it has verified itself, so a bad alert with
a good signature is evidence against its signer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

from sca.alert import Alert
from sca.codec import (
    MAX_ENCODED_BYTES,
    FormatError,
    check_bytes,
    check_map,
    check_uint,
    decode_alert,
    dump_in_order,
    load_strict,
)
from sca.keys import PUBLIC_KEY_LEN, SIGNATURE_LEN, NodeKey, node_id_of, verify_signature

ENVELOPE_VERSION = 1
CONTEXT = b"herdwall-sca-envelope-v1\0"
# The alert plus fixed fields (keys, 32-byte key, 64-byte signature, 9-byte time, heads).
MAX_ENVELOPE_BYTES = MAX_ENCODED_BYTES + 256
_MAX_TIME_MS = 2**63 - 1
_KEYS = frozenset({"v", "alert", "key", "t", "sig"})


class EnvelopeFormatError(FormatError):
    """An envelope encoding that is not valid."""

    what = "envelope"


class SignatureError(FormatError):
    """An envelope whose signature does not match its alert, time and key."""

    what = "signature"


def signed_message(alert_bytes: bytes, signed_at: int) -> bytes:
    """The exact bytes the Ed25519 signature covers."""
    return b"".join((CONTEXT, struct.pack(">I", len(alert_bytes)), alert_bytes,
                     struct.pack(">Q", signed_at)))


@dataclass(frozen=True, slots=True)
class Envelope:
    alert_bytes: bytes
    public_key: bytes
    signed_at: int  # unix time in milliseconds
    signature: bytes

    @property
    def node_id(self) -> bytes:
        """The signer's node id (whether or not the signature is good: call ``check``)."""
        return node_id_of(self.public_key)

    @property
    def signed_at_s(self) -> float:
        return self.signed_at / 1000

    def check(self) -> None:
        """Raise ``SignatureError`` unless the signature is good."""
        if not verify_signature(self.public_key, self.signature,
                                signed_message(self.alert_bytes, self.signed_at)):
            raise SignatureError(
                f"signature does not match (claimed signer {self.node_id.hex()})")

    def open(self) -> Alert:
        """Check the signature, then decode the alert (``AlertFormatError`` if it is bad)."""
        self.check()
        return decode_alert(self.alert_bytes)

    def encode(self) -> bytes:
        # In canonical key order (``dump_in_order``).
        return dump_in_order({"t": self.signed_at, "v": ENVELOPE_VERSION,
                              "key": self.public_key, "sig": self.signature,
                              "alert": self.alert_bytes})


def seal(alert_bytes: bytes, key: NodeKey, now: float) -> Envelope:
    """Sign ``alert_bytes`` (a canonical alert encoding: checked) at ``now``, unix time in
    seconds as ``time.time()`` gives it; the envelope keeps whole milliseconds."""
    decode_alert(alert_bytes)  # a node never signs something it cannot read back
    if isinstance(now, bool) or not isinstance(now, int | float):
        raise TypeError(f"now must be unix seconds (int or float), got {type(now).__name__}")
    signed_at = int(now * 1000)
    if not 0 <= signed_at <= _MAX_TIME_MS:
        raise ValueError(f"signing time {now!r} out of range")
    signature = key.sign(signed_message(alert_bytes, signed_at))
    return Envelope(alert_bytes=alert_bytes, public_key=key.public_bytes, signed_at=signed_at,
                    signature=signature)


def encode_envelope(envelope: Envelope) -> bytes:
    """The canonical encoding of ``envelope`` (same as ``envelope.encode()``)."""
    return envelope.encode()


def _fail(reason: str) -> NoReturn:
    raise EnvelopeFormatError(reason)


def decode_envelope(data: bytes) -> Envelope:
    """Parse an envelope strictly (shape, sizes, canonical form). Does NOT check the signature
    or decode the alert inside: ``Envelope.open()`` does both."""
    raw = load_strict(data, limit=MAX_ENVELOPE_BYTES, error=EnvelopeFormatError)
    top = check_map(raw, _KEYS, "envelope", EnvelopeFormatError)
    version = check_uint(top["v"], "version", EnvelopeFormatError)
    if version != ENVELOPE_VERSION:
        _fail(f"unsupported version {version}, this node reads version {ENVELOPE_VERSION}")
    alert_bytes = check_bytes(top["alert"], "alert", EnvelopeFormatError)
    if len(alert_bytes) > MAX_ENCODED_BYTES:
        _fail(f"alert of {len(alert_bytes)} bytes, at most {MAX_ENCODED_BYTES}")
    public_key = check_bytes(top["key"], "key", EnvelopeFormatError)
    if len(public_key) != PUBLIC_KEY_LEN:
        _fail(f"key must be {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    signed_at = check_uint(top["t"], "signing time", EnvelopeFormatError, limit=_MAX_TIME_MS)
    signature = check_bytes(top["sig"], "signature", EnvelopeFormatError)
    if len(signature) != SIGNATURE_LEN:
        _fail(f"signature must be {SIGNATURE_LEN} bytes, got {len(signature)}")
    envelope = Envelope(alert_bytes=alert_bytes, public_key=public_key, signed_at=signed_at,
                        signature=signature)
    again = envelope.encode()
    if again != data:
        if data.startswith(again):
            _fail(f"{len(data) - len(again)} trailing bytes after the envelope")
        _fail("not the canonical encoding")
    return envelope


def open_envelope(data: bytes) -> tuple[Envelope, Alert]:
    """Decode, check the signature, decode the alert: the whole path for received bytes."""
    envelope = decode_envelope(data)
    return envelope, envelope.open()


def sniff(data: bytes) -> str | None:
    """``"envelope"``, ``"alert"`` or ``None``: which decoder ``data`` is meant for, judged by
    the top-level map's keys only (the decoders then check everything)."""
    try:
        raw = load_strict(data, limit=MAX_ENVELOPE_BYTES, error=EnvelopeFormatError)
    except FormatError:
        return None
    if type(raw) is not dict:
        return None
    if "sig" in raw or "alert" in raw:
        return "envelope"
    if "service" in raw or "messages" in raw:
        return "alert"
    return None
