"""sca.codec: canonical alert encoding, strict decoding, alert ids."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sca.alert import (
    CRITICAL_CALLS,
    MAX_MESSAGES,
    MAX_TOTAL_BYTES,
    Alert,
    AlertType,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
)
from sca.codec import (
    MAX_ARGUMENT_REFS,
    MAX_ENCODED_BYTES,
    MAX_TARGET_BYTES,
    AlertFormatError,
    FormatError,
    alert_id,
    alert_id_hex,
    check_alert,
    decode_alert,
    encode_alert,
    encoding_id_hex,
)

# --- strategies -------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=24).filter(
    lambda s: s.isprintable() and len(s.encode()) <= 64)


@st.composite
def message_lists(draw: st.DrawFn) -> tuple[Message, ...]:
    count = draw(st.integers(1, MAX_MESSAGES))
    datas = [draw(st.binary(max_size=48)) for _ in range(count)]
    if not any(datas):
        datas[0] = draw(st.binary(min_size=1, max_size=48))
    if draw(st.booleans()):
        return tuple(Message(d) for d in datas)
    # Connection numbers in order of first use: each message reuses one or opens the next.
    out, opened = [], 0
    for d in datas:
        conn = draw(st.integers(0, opened))
        opened += conn == opened
        out.append(Message(d, conn))
    return tuple(out)


@st.composite
def alerts(draw: st.DrawFn, kind: AlertType | None = None) -> Alert:
    messages = draw(message_lists())
    all_refs = [ByteRef(i, o) for i, m in enumerate(messages) for o in range(len(m.data))]
    kind = kind or draw(st.sampled_from(list(AlertType)))

    def ref_lists(limit: int) -> st.SearchStrategy[list[ByteRef]]:
        return st.lists(st.sampled_from(all_refs), min_size=1, max_size=min(limit, 24),
                        unique=True)

    verification: Any
    if kind is AlertType.EXECUTION_CONTROL:
        verification = ExecutionControl(tuple(draw(ref_lists(MAX_TARGET_BYTES))))
    elif kind is AlertType.CODE_EXECUTION:
        verification = CodeExecution(draw(st.sampled_from(all_refs)))
    else:
        verification = FunctionArgument(draw(st.sampled_from(CRITICAL_CALLS)),
                                        draw(st.integers(0, 5)),
                                        tuple(draw(ref_lists(MAX_ARGUMENT_REFS))))
    return Alert(service_id=draw(st.binary(min_size=32, max_size=32)),
                 service_name=draw(names), messages=messages, verification=verification)


def sample(kind: AlertType = AlertType.EXECUTION_CONTROL, **changes: Any) -> Alert:
    messages = changes.pop("messages", (Message(b"\x04" + b"A" * 40 + b"\xef\xbe\xad\xde"),))
    verification = {
        AlertType.EXECUTION_CONTROL: ExecutionControl(tuple(ByteRef(0, 41 + i) for i in range(4))),
        AlertType.CODE_EXECUTION: CodeExecution(ByteRef(0, 1)),
        AlertType.FUNCTION_ARGUMENT: FunctionArgument("execve", 0, (ByteRef(0, 1), ByteRef(0, 2))),
    }[kind]
    fields: dict[str, Any] = {"service_id": hashlib.sha256(b"svc").digest(),
                              "service_name": "udp-echo", "messages": messages,
                              "verification": verification}
    fields.update(changes)
    return Alert(**fields)


# --- round trip and canonical form --------------------------------------------------------------


@given(alerts())
def test_round_trip_is_exact(alert: Alert) -> None:
    data = encode_alert(alert)
    again = decode_alert(data)
    assert again == alert
    assert encode_alert(again) == data
    assert alert_id(alert) == alert_id(data) == hashlib.sha256(data).digest()
    assert alert_id_hex(data) == alert_id(alert).hex()


@pytest.mark.parametrize("kind", list(AlertType))
@given(data=st.data())
def test_every_type_round_trips(kind: AlertType, data: st.DataObject) -> None:
    alert = data.draw(alerts(kind))
    assert alert.type is kind
    assert decode_alert(encode_alert(alert)) == alert


@given(alerts())
def test_encoding_is_canonical_cbor(alert: Alert) -> None:
    data = encode_alert(alert)
    raw = cbor2.loads(data)
    assert cbor2.dumps(raw, canonical=True) == data
    assert set(raw) == {"v", "service", "name", "type", "messages", "info"}


def test_layout_is_as_documented() -> None:
    raw = cbor2.loads(encode_alert(sample(AlertType.FUNCTION_ARGUMENT)))
    assert raw["v"] == 1
    assert raw["type"] == "function-argument"
    assert raw["messages"] == [[None, b"\x04" + b"A" * 40 + b"\xef\xbe\xad\xde"]]
    assert raw["info"] == {"call": "execve", "arg": 0, "bytes": [[0, 1], [0, 2]]}
    raw = cbor2.loads(encode_alert(sample(AlertType.CODE_EXECUTION)))
    assert raw["info"] == {"code": [0, 1]}


def test_same_alert_built_twice_has_one_id() -> None:
    assert encode_alert(sample()) == encode_alert(sample())
    assert alert_id(sample()) != alert_id(sample(service_name="other"))


def test_largest_alert_fits_under_the_encoding_cap() -> None:
    messages = tuple(Message(bytes(MAX_TOTAL_BYTES // MAX_MESSAGES), 0)
                     for _ in range(MAX_MESSAGES))
    # 4096 refs with the largest offsets (3-byte heads) spread over every message.
    size = MAX_TOTAL_BYTES // MAX_MESSAGES
    per_message = MAX_ARGUMENT_REFS // MAX_MESSAGES
    refs = tuple(ByteRef(m, size - 1 - o) for m in range(MAX_MESSAGES)
                 for o in range(per_message))
    alert = sample(messages=messages,
                   verification=FunctionArgument("execve", 5, refs), service_name="x" * 64)
    data = encode_alert(alert)
    assert len(data) <= MAX_ENCODED_BYTES
    assert decode_alert(data) == alert


# --- refusals -----------------------------------------------------------------------------------


def raw_sample(kind: AlertType = AlertType.EXECUTION_CONTROL) -> dict[str, Any]:
    return cbor2.loads(encode_alert(sample(kind)))


def refused(data: Any, *words: str) -> AlertFormatError:
    with pytest.raises(AlertFormatError) as info:
        decode_alert(data)
    for word in words:
        assert word in info.value.reason, info.value.reason
    assert isinstance(info.value, FormatError) and isinstance(info.value, ValueError)
    return info.value


def refused_raw(mutate: Callable[[dict[str, Any]], Any], *words: str,
                kind: AlertType = AlertType.EXECUTION_CONTROL) -> None:
    raw = raw_sample(kind)
    mutate(raw)  # in place; a return value (as from dict.pop) is ignored
    refused(cbor2.dumps(raw, canonical=True), *words)


@pytest.mark.parametrize("value", ["text", bytearray(b"\xa0"), memoryview(b"\xa0"), None, 5])
def test_refuses_non_bytes(value: Any) -> None:
    refused(value, "expected bytes")


def test_refuses_too_large_before_parsing() -> None:
    # A huge array head followed by junk would be costly to parse; the size check comes first.
    start = time.perf_counter()
    refused(b"\x9b" + b"\xff" * (MAX_ENCODED_BYTES + 10), "too large")
    assert time.perf_counter() - start < 0.1


def test_refuses_more_than_64k_of_messages() -> None:
    raw = raw_sample()
    raw["messages"] = [[None, b"A" * 40000], [None, b"B" * 40000]]
    refused(cbor2.dumps(raw, canonical=True), "bytes of messages")


@pytest.mark.parametrize("data,words", [
    (b"", ("empty",)),
    (b"\xff", ("CBOR",)),
    (b"\xa1", ("CBOR",)),
    (b"\x5f\x41\x01\xff", ("CBOR",)),  # indefinite length
    (b"\xa2\x61a\x01\x61a\x02", ("CBOR",)),  # duplicate keys
    (b"\x81" * 100, ("CBOR",)),  # deep nesting
    (b"\x61\xff", ("CBOR",)),  # bad UTF-8
])
def test_refuses_bad_cbor(data: bytes, words: tuple[str, ...]) -> None:
    refused(data, *words)


@pytest.mark.parametrize("head", [
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # byte string of 2**64-1 bytes
    b"\x7b\x7f\xff\xff\xff\xff\xff\xff\xff",  # text string of 2**63-1 bytes
    b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # array of 2**64-1 items
    b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff",  # map of 2**64-1 pairs
    b"\xa1\x61v\x5a\xff\xff\xff\xff",
])
def test_hostile_length_prefixes_fail_fast(head: bytes) -> None:
    start = time.perf_counter()
    refused(head + b"\x00" * 100)
    assert time.perf_counter() - start < 0.5


def test_refuses_trailing_bytes() -> None:
    refused(encode_alert(sample()) + b"\x00", "trailing")


def test_refuses_non_canonical_integer() -> None:
    data = encode_alert(sample())
    assert data.startswith(b"\xa6\x61v\x01")
    refused(b"\xa6\x61v\x18\x01" + data[4:], "canonical")


def test_refuses_unsorted_keys() -> None:
    raw = raw_sample()
    backwards = dict(reversed(list(raw.items())))
    data = cbor2.dumps(backwards)  # not canonical: keys in the wrong order
    assert data != encode_alert(sample())
    refused(data, "canonical")


def test_refuses_every_semantic_tag() -> None:
    def tagged(tag: int) -> bytes:
        if tag < 24:
            head = bytes([0xC0 | tag])
        elif tag < 256:
            head = bytes([0xD8, tag])
        elif tag < 65536:
            head = b"\xd9" + tag.to_bytes(2, "big")
        else:
            head = b"\xda" + tag.to_bytes(4, "big")
        return head

    # cbor2 decodes some tags itself (datetimes, bignums, sets, ...): every tag number up to
    # 70,000 must still be refused, whatever it wraps.
    for tag in [*range(70000), 2**32 - 1]:
        with pytest.raises(AlertFormatError):
            decode_alert(tagged(tag) + b"\x01")
    for tag in [*range(300), 1004, 43000, 55799]:
        for payload in (b"\x41\x01", b"\x60", b"\x80", b"\xa0"):
            with pytest.raises(AlertFormatError):
                decode_alert(tagged(tag) + payload)
    refused(tagged(1) + b"\x01", "tag")
    refused(tagged(30000) + b"\x01", "tag")
    # A tag deep inside a valid-looking alert, too.
    refused_raw(lambda r: r.update(v=cbor2.CBORTag(2, b"\x01")), "tag")


@pytest.mark.parametrize("value", [2, 0, 2**64 - 1])
def test_refuses_other_versions(value: int) -> None:
    refused_raw(lambda r: r.update(v=value), "version")


@pytest.mark.parametrize("field", ["v", "service", "name", "type", "messages", "info"])
def test_refuses_missing_field(field: str) -> None:
    refused_raw(lambda r: r.pop(field), "missing", field)


def test_refuses_unknown_fields() -> None:
    refused_raw(lambda r: r.update(extra=1), "unknown field", "extra")
    refused_raw(lambda r: r.update({1: 1}), "unknown field")
    refused_raw(lambda r: r["info"].update(code=[0, 1]), "unknown field", "code")
    refused_raw(lambda r: r["info"].pop("target"), "missing", "target")


@pytest.mark.parametrize("mutate,words", [
    (lambda r: r.update(v=True), ("version", "bool")),
    (lambda r: r.update(v=1.0), ("version", "float")),
    (lambda r: r.update(v="1"), ("version", "text")),
    (lambda r: r.update(service="ab" * 16), ("service id", "text")),
    (lambda r: r.update(name=b"udp-echo"), ("name", "bytes")),
    (lambda r: r.update(type=1), ("type",)),
    (lambda r: r.update(type="buffer-overflow"), ("unknown alert type",)),
    (lambda r: r.update(messages={}), ("messages", "map")),
    (lambda r: r.update(messages=[[None]]), ("pair",)),
    (lambda r: r.update(messages=[b"x"]), ("pair",)),
    (lambda r: r["messages"][0].__setitem__(0, True), ("connection", "bool")),
    (lambda r: r["messages"][0].__setitem__(0, "0"), ("connection", "text")),
    (lambda r: r["messages"][0].__setitem__(1, "data"), ("data", "text")),
    (lambda r: r.update(info=[]), ("map",)),
    (lambda r: r["info"].update(target={}), ("target", "array")),
    (lambda r: r["info"]["target"].__setitem__(0, [0, True]), ("offset", "bool")),
    (lambda r: r["info"]["target"].__setitem__(0, [False, 1]), ("message", "bool")),
    (lambda r: r["info"]["target"].__setitem__(0, [0]), ("pair",)),
    (lambda r: r["info"]["target"].__setitem__(0, 41), ("pair",)),
])
def test_refuses_wrong_types(mutate: Callable[[dict[str, Any]], Any],
                             words: tuple[str, ...]) -> None:
    refused_raw(mutate, *words)


def test_refuses_wrong_types_in_function_argument() -> None:
    kind = AlertType.FUNCTION_ARGUMENT
    refused_raw(lambda r: r["info"].update(arg=True), "argument", "bool", kind=kind)
    refused_raw(lambda r: r["info"].update(call=b"execve"), "call", kind=kind)
    refused_raw(lambda r: r["info"].update(bytes=b"\x00\x01"), "array", kind=kind)


def test_refuses_wrong_types_in_code_execution() -> None:
    kind = AlertType.CODE_EXECUTION
    refused_raw(lambda r: r["info"].update(code=[[0, 1]]), "code", kind=kind)
    refused_raw(lambda r: r["info"].update(code=[0, -1]), "negative", kind=kind)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_refuses_service_id_not_32_bytes(size: int) -> None:
    refused_raw(lambda r: r.update(service=bytes(size)), "service id", "32")


@pytest.mark.parametrize("name,words", [
    ("", ("empty",)),
    ("x" * 65, ("longer",)),
    ("é" * 33, ("longer",)),  # 66 UTF-8 bytes
    ("udp\necho", ("printable",)),
    ("\x1b[31mred", ("printable",)),
])
def test_refuses_bad_names(name: str, words: tuple[str, ...]) -> None:
    refused_raw(lambda r: r.update(name=name), *words)


def test_accepts_a_64_byte_name() -> None:
    alert = sample(service_name="x" * 64)
    assert decode_alert(encode_alert(alert)) == alert


def test_refuses_message_counts() -> None:
    refused_raw(lambda r: r.update(messages=[]), "no messages")
    refused_raw(lambda r: r.update(messages=r["messages"] * 17), "17 messages")
    alert = sample(messages=tuple(Message(b"x" * 45) for _ in range(16)))
    assert decode_alert(encode_alert(alert)) == alert


def test_refuses_connection_faults() -> None:
    refused_raw(lambda r: r["messages"][0].__setitem__(0, -1), "negative")
    refused_raw(lambda r: r["messages"].append([0, b"x"]), "mixes")
    refused_raw(lambda r: r["messages"].insert(0, [0, b"x"]), "mixes")
    # Canonical numbering: the first connection is 0, the next new one 1, and so on.
    refused_raw(lambda r: r["messages"][0].__setitem__(0, 1), "numbered")
    refused_raw(lambda r: r.update(messages=[[0, r["messages"][0][1]], [2, b"x"]]), "numbered")
    fine = sample(messages=(Message(b"\x04" + b"A" * 44, 0), Message(b"y", 1), Message(b"z", 0)))
    assert decode_alert(encode_alert(fine)) == fine


def test_refuses_refs_outside_messages() -> None:
    refused_raw(lambda r: r["info"]["target"].__setitem__(0, [0, 45]), "outside")
    refused_raw(lambda r: r["info"]["target"].__setitem__(0, [1, 0]), "does not exist")
    refused_raw(lambda r: r["info"].update(code=[0, 10**6]), "outside",
                kind=AlertType.CODE_EXECUTION)
    refused_raw(lambda r: r["info"]["bytes"].append([0, 2**64 - 1]), "outside",
                kind=AlertType.FUNCTION_ARGUMENT)


def test_refuses_negative_numbers() -> None:
    refused_raw(lambda r: r.update(v=-1), "negative")
    refused_raw(lambda r: r["info"]["target"].__setitem__(0, [0, -1]), "negative")
    refused_raw(lambda r: r["info"]["target"].__setitem__(0, [-1, 0]), "negative")
    refused_raw(lambda r: r["info"]["target"].__setitem__(0, [0, -(2**64)]), "negative")
    refused_raw(lambda r: r["info"].update(arg=-1), "negative",
                kind=AlertType.FUNCTION_ARGUMENT)


def test_refuses_unknown_calls_and_arguments() -> None:
    kind = AlertType.FUNCTION_ARGUMENT
    refused_raw(lambda r: r["info"].update(call="system"), "unknown critical call", kind=kind)
    refused_raw(lambda r: r["info"].update(call=""), "unknown critical call", kind=kind)
    refused_raw(lambda r: r["info"].update(arg=6), "argument 6", kind=kind)


def test_refuses_empty_and_overlong_ref_lists() -> None:
    refused_raw(lambda r: r["info"].update(target=[]), "empty")
    refused_raw(lambda r: r["info"].update(bytes=[]), "empty", kind=AlertType.FUNCTION_ARGUMENT)
    refused_raw(lambda r: r["info"].update(target=[[0, i] for i in range(9)]), "at most 8")
    refused_raw(lambda r: r.update(messages=[[None, bytes(5000)]]) or r["info"].update(
        bytes=[[0, i] for i in range(MAX_ARGUMENT_REFS + 1)]), "at most",
        kind=AlertType.FUNCTION_ARGUMENT)


def test_refuses_duplicate_refs() -> None:
    refused_raw(lambda r: r["info"].update(target=[[0, 1], [0, 2], [0, 1]]), "twice")
    refused_raw(lambda r: r["info"].update(bytes=[[0, 3], [0, 3]]), "twice",
                kind=AlertType.FUNCTION_ARGUMENT)


def test_refuses_other_cbor_values_where_ints_belong() -> None:
    for value in (None, b"", [], {}, cbor2.undefined, cbor2.CBORSimpleValue(16), 1.5):
        refused_raw(lambda r, value=value: r.update(v=value))


# --- encode refuses what decode would refuse ----------------------------------------------------


@pytest.mark.parametrize("alert", [
    sample(service_id=b"short"),
    sample(service_name=""),
    sample(messages=()),
    sample(messages=(Message(b"\x04" + b"A" * 44, True),)),  # type: ignore[arg-type]
    sample(messages=[Message(b"\x04" + b"A" * 44)]),  # type: ignore[arg-type]
    sample(messages=(Message("text"),)),  # type: ignore[arg-type]
    sample(verification=ExecutionControl(())),
    sample(verification=ExecutionControl((ByteRef(0, 99),))),
    sample(verification=ExecutionControl(((0, 1),))),  # type: ignore[arg-type]
    sample(verification=FunctionArgument("system", 0, (ByteRef(0, 1),))),
    sample(verification=FunctionArgument("execve", True, (ByteRef(0, 1),))),  # type: ignore
    sample(version=2),
])
def test_encode_refuses_invalid_alerts(alert: Alert) -> None:
    with pytest.raises(AlertFormatError):
        encode_alert(alert)
    with pytest.raises(AlertFormatError):
        check_alert(alert)


def test_encode_refuses_non_alerts() -> None:
    with pytest.raises(AlertFormatError):
        encode_alert({"v": 1})  # type: ignore[arg-type]


def test_alert_id_of_bad_bytes_is_refused() -> None:
    with pytest.raises(AlertFormatError):
        alert_id(encode_alert(sample()) + b"\x00")


def test_encoding_id_is_the_alert_id_without_the_check() -> None:
    data = encode_alert(sample())
    assert encoding_id_hex(data) == alert_id_hex(data) == alert_id(sample()).hex()
    assert encoding_id_hex(data + b"\x00") != alert_id_hex(data)  # no check: another id


# --- mutation fuzzing ---------------------------------------------------------------------------

INTERESTING = [0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20, 0x38, 0x3B, 0x40, 0x58,
               0x5B, 0x5F, 0x60, 0x78, 0x7B, 0x7F, 0x80, 0x98, 0x9B, 0x9F, 0xA0, 0xB8, 0xBB,
               0xBF, 0xC0, 0xC1, 0xC2, 0xD8, 0xD9, 0xDB, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9,
               0xFA, 0xFB, 0xFF]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 3 else 6)
    if choice == 0:
        return rng.choice([0, 1, -1, 23, 24, 255, 256, 2**32, 2**64 - 1, -(2**64), True, False])
    if choice == 1:
        return rng.randbytes(rng.choice([0, 1, 32, 33, 100]))
    if choice == 2:
        return rng.choice(["v", "service", "name", "type", "messages", "info", "target", "code",
                           "call", "arg", "bytes", "execve", "execution-control", ""])
    if choice == 3:
        return rng.choice([None, 1.5, cbor2.undefined, cbor2.CBORSimpleValue(99)])
    if choice == 4:
        return [rng.randrange(3), rng.randrange(64)]
    if choice == 5:
        return cbor2.CBORTag(rng.choice([0, 1, 2, 24, 28, 55799, 9999]), rng.randrange(5))
    if choice in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["v", "service", "name", "type", "messages", "info", "target", "code", "x"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(7))}


def _mutate(rng: random.Random, seeds: list[bytes], cbor_values: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[pos:]
        elif op == 2:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and data:  # interesting byte
            data[pos % len(data)] = rng.choice(INTERESTING)
        elif op == 4:  # delete a run
            del data[pos:pos + rng.randrange(1, 17)]
        elif op == 5:  # splice with another seed or a random CBOR value
            other = rng.choice(seeds + cbor_values)
            cut = rng.randrange(len(other) + 1)
            data[pos:] = other[cut:]
        elif op == 6 and data:  # duplicate a slice
            end = min(len(data), pos + rng.randrange(1, 33))
            data[pos:pos] = data[pos:end]
        elif op == 7:  # overwrite with a random CBOR value
            value = rng.choice(cbor_values)
            data[pos:pos + len(value)] = value
        elif op == 8 and data:  # bump a byte
            data[pos % len(data)] = (data[pos % len(data)] + rng.choice((1, -1))) % 256
    if not data:
        return bytes([rng.choice(INTERESTING)])
    return bytes(data)


def _fuzz_seeds(rng: random.Random) -> list[bytes]:
    seeds = [encode_alert(sample(kind)) for kind in AlertType]
    for _ in range(30):
        count = rng.randrange(1, 5)
        streams = rng.random() < 0.5
        messages = tuple(Message(rng.randbytes(rng.randrange(1, 40)), i if streams else None)
                         for i in range(count))
        refs = tuple({ByteRef(rng.randrange(count), 0) for _ in range(3)})
        kind = rng.choice(list(AlertType))
        verification: Any = {
            AlertType.EXECUTION_CONTROL: ExecutionControl(refs),
            AlertType.CODE_EXECUTION: CodeExecution(refs[0]),
            AlertType.FUNCTION_ARGUMENT: FunctionArgument("execve", rng.randrange(6), refs),
        }[kind]
        seeds.append(encode_alert(sample(messages=messages, verification=verification)))
    return seeds


def test_mutation_fuzz_only_ever_raises_alert_format_error() -> None:
    rng = random.Random(20240611)
    seeds = _fuzz_seeds(rng)
    cbor_values = [cbor2.dumps(_random_value(rng), canonical=rng.random() < 0.5)
                   for _ in range(2000)]
    accepted = refused_count = 0
    cases = 100_000
    for i in range(cases):
        if i % 10 == 0:
            data = rng.choice(cbor_values) if i % 20 else rng.randbytes(rng.randrange(1, 300))
        else:
            data = _mutate(rng, seeds, cbor_values)
        try:
            alert = decode_alert(data)
        except AlertFormatError as exc:
            refused_count += 1
            assert exc.reason and "\n" not in exc.reason
            continue
        except Exception as exc:  # pragma: no cover - this is the failure being hunted
            pytest.fail(f"{type(exc).__name__} escaped decode_alert for {data.hex()}: {exc}")
        # Whatever is accepted is canonical and valid.
        accepted += 1
        assert encode_alert(alert) == data
    assert accepted + refused_count == cases
    # Most mutants are refused; some still decode (valid, canonical): both paths are exercised.
    assert refused_count > cases // 2 and accepted > 100
