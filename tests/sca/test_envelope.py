"""sca.envelope: sealing, strict decoding, signature checks."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import cbor2
import pytest

from sca.alert import Alert, ByteRef, ExecutionControl, Message
from sca.codec import AlertFormatError, FormatError, encode_alert
from sca.envelope import (
    CONTEXT,
    MAX_ENVELOPE_BYTES,
    Envelope,
    EnvelopeFormatError,
    SignatureError,
    decode_envelope,
    open_envelope,
    seal,
    signed_message,
    sniff,
)
from sca.keys import NodeKey

KEY = NodeKey.from_private_bytes(hashlib.sha256(b"test key").digest())
NOW = 1_700_000_000.123


def make_alert() -> Alert:
    return Alert(service_id=hashlib.sha256(b"svc").digest(), service_name="udp-echo",
                 messages=(Message(b"\x04" + b"A" * 30 + b"\x78\x56\x34\x12"),),
                 verification=ExecutionControl(tuple(ByteRef(0, 31 + i) for i in range(4))))


def wire() -> bytes:
    return seal(encode_alert(make_alert()), KEY, NOW).encode()


def test_seal_and_open() -> None:
    alert_bytes = encode_alert(make_alert())
    envelope = seal(alert_bytes, KEY, NOW)
    assert envelope.signed_at == 1_700_000_000_123
    assert envelope.signed_at_s == pytest.approx(NOW)
    assert envelope.public_key == KEY.public_bytes
    assert envelope.node_id == KEY.node_id
    data = envelope.encode()
    again, alert = open_envelope(data)
    assert again == envelope
    assert alert == make_alert()
    assert decode_envelope(data).encode() == data


def test_signature_covers_context_length_alert_and_time() -> None:
    alert_bytes = encode_alert(make_alert())
    message = signed_message(alert_bytes, 1234)
    assert message == (CONTEXT + struct.pack(">I", len(alert_bytes)) + alert_bytes
                       + struct.pack(">Q", 1234))
    assert CONTEXT == b"herdwall-sca-envelope-v1\0"


def test_layout_is_as_documented() -> None:
    raw = cbor2.loads(wire())
    assert set(raw) == {"v", "alert", "key", "t", "sig"}
    assert raw["v"] == 1 and raw["t"] == 1_700_000_000_123
    assert raw["alert"] == encode_alert(make_alert())
    assert cbor2.dumps(raw, canonical=True) == wire()  # deterministic CBOR


def test_every_single_byte_change_is_refused() -> None:
    data = wire()
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            forged = bytearray(data)
            forged[i] ^= flip
            with pytest.raises(FormatError):
                open_envelope(bytes(forged))


def test_tampered_fields_fail_the_signature() -> None:
    good = seal(encode_alert(make_alert()), KEY, NOW)
    other_alert = encode_alert(Alert(**{**_fields(make_alert()), "service_name": "other"}))
    cases = [
        Envelope(other_alert, good.public_key, good.signed_at, good.signature),
        Envelope(good.alert_bytes, good.public_key, good.signed_at + 1, good.signature),
        Envelope(good.alert_bytes, NodeKey.generate().public_bytes, good.signed_at,
                 good.signature),
    ]
    for envelope in cases:
        with pytest.raises(SignatureError, match="signature does not match"):
            envelope.open()
        with pytest.raises(SignatureError):
            decode_envelope(envelope.encode()).check()


def _fields(alert: Alert) -> dict[str, Any]:
    return {"service_id": alert.service_id, "service_name": alert.service_name,
            "messages": alert.messages, "verification": alert.verification}


def test_good_signature_on_a_bad_alert_is_still_refused() -> None:
    # Signatures say who sent it, never that it is valid.
    junk = b"\xa0"
    envelope = Envelope(junk, KEY.public_bytes, 5, KEY.sign(signed_message(junk, 5)))
    envelope.check()
    with pytest.raises(AlertFormatError):
        envelope.open()


def test_seal_refuses_bad_input() -> None:
    with pytest.raises(AlertFormatError):
        seal(b"\xa0", KEY, NOW)
    with pytest.raises(TypeError):
        seal(encode_alert(make_alert()), KEY, True)
    with pytest.raises(TypeError):
        seal(encode_alert(make_alert()), KEY, "now")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seal(encode_alert(make_alert()), KEY, -1)


def raw_envelope() -> dict[str, Any]:
    return cbor2.loads(wire())


@pytest.mark.parametrize("change,words", [
    ({"v": 2}, "version"),
    ({"v": True}, "bool"),
    ({"key": bytes(31)}, "32 bytes"),
    ({"sig": bytes(63)}, "64 bytes"),
    ({"t": -1}, "negative"),
    ({"t": True}, "bool"),
    ({"t": 2**64 - 1}, "at most"),
    ({"alert": "text"}, "bytes"),
    ({"extra": 1}, "unknown field"),
])
def test_decode_refuses_bad_fields(change: dict[str, Any], words: str) -> None:
    raw = raw_envelope()
    raw.update(change)
    with pytest.raises(EnvelopeFormatError, match=words):
        decode_envelope(cbor2.dumps(raw, canonical=True))


@pytest.mark.parametrize("field", ["v", "alert", "key", "t", "sig"])
def test_decode_refuses_missing_fields(field: str) -> None:
    raw = raw_envelope()
    del raw[field]
    with pytest.raises(EnvelopeFormatError, match="missing"):
        decode_envelope(cbor2.dumps(raw, canonical=True))


def test_decode_refuses_framing_faults() -> None:
    data = wire()
    for bad, words in [(data + b"\x00", "trailing"), (data[:-1], "CBOR"),
                       (cbor2.dumps(dict(reversed(list(cbor2.loads(data).items())))),
                        "canonical"),
                       (b"\x00" * (MAX_ENVELOPE_BYTES + 1), "too large"),
                       (bytearray(data), "expected bytes"),
                       (b"\xc1" + data, "CBOR|tag")]:
        with pytest.raises(EnvelopeFormatError, match=words):
            decode_envelope(bad)  # type: ignore[arg-type]


def test_errors_share_one_base() -> None:
    for exc in (EnvelopeFormatError, SignatureError, AlertFormatError):
        assert issubclass(exc, FormatError) and issubclass(exc, ValueError)


def test_sniff() -> None:
    assert sniff(wire()) == "envelope"
    assert sniff(encode_alert(make_alert())) == "alert"
    assert sniff(b"\xff") is None
    assert sniff(b"\x01") is None
    assert sniff(cbor2.dumps({"x": 1})) is None
