"""Alert generation (sca.generate): minimal alerts, identical alerts from independent
detectors, candidate order, and the bounded message log."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from sca.alert import (
    MAX_MESSAGES,
    Alert,
    ByteRef,
    CodeExecution,
    ExecutionControl,
    FunctionArgument,
    Message,
    verification_refs,
)
from sca.codec import alert_id, decode_alert, encode_alert
from sca.emu.image import load_image
from sca.generate import Detector, Generated, MessageLog, candidates
from sca.services import SAMPLES, manifest_path, traffic
from sca.services._traffic import ExploitCase
from sca.taint.engine import Detection
from sca.verify import Verifier

Get = Callable[[str, int], Generated]
TCP = ("httpd", "rpcd", "mgmtd")


def _after(before: list[Message], exploit: tuple[Message, ...]) -> tuple[Message, ...]:
    """``exploit``'s messages after the ``before`` session, its connections renumbered to follow."""
    if exploit[0].connection is None:
        return (*before, *exploit)
    shift = 1 + max((m.connection for m in before if m.connection is not None), default=-1)
    return (*before, *(Message(m.data, m.connection + shift) for m in exploit))  # type: ignore[operator]


def _generate(det: Detector, verifier: Verifier, messages: tuple[Message, ...]) -> Generated:
    run = det.inspect(messages)
    assert run.detection is not None
    g = det.generate(messages, run.detection, verifier)
    assert g is not None
    return g


def _same_bytes(alert: Alert, case: ExploitCase) -> None:
    """The alert's references name the same bytes (values) as the exploit's ground truth."""
    got = bytes(alert.messages[r.message].data[r.offset] for r in alert.refs())
    want_refs = verification_refs(case.verification)
    want = bytes(case.messages[r.message].data[r.offset] for r in want_refs)
    assert got == want[: len(got)] and got


# -- minimal alerts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TCP)
def test_benign_connections_before_the_exploit_are_left_out(
    name: str,
    detectors: dict[str, Detector],
    verifier: Verifier,
    cases: dict[str, list[ExploitCase]],
    benign: dict[str, list[list[Message]]],
) -> None:
    case = cases[name][0]  # one connection, one chunk
    for before in benign[name][:8]:
        g = _generate(detectors[name], verifier, _after(before, case.messages))
        assert g.alert.messages == tuple(Message(m.data, 0) for m in case.messages)
        assert g.alert.verification == case.verification
        assert g.tried == 1, "the smallest candidate is tried first and verifies"


def test_benign_datagrams_before_the_exploit_are_left_out(
    detectors: dict[str, Detector],
    verifier: Verifier,
    cases: dict[str, list[ExploitCase]],
    benign: dict[str, list[list[Message]]],
) -> None:
    for i, case in enumerate(cases["resolver"]):
        before = [m for s in benign["resolver"][i : i + 3] for m in s]
        g = _generate(detectors["resolver"], verifier, _after(before, case.messages))
        assert g.alert.messages == case.messages[-1:], "only the exploit datagram"
        _same_bytes(g.alert, case)


def _minimal(alert: Alert, case: ExploitCase) -> bool:
    """Only the exploit's own datagrams, or its own connection's chunks (renumbered 0)."""
    used = {r.message for r in verification_refs(case.verification)}
    if case.messages[0].connection is None:
        return alert.messages == tuple(case.messages[u] for u in sorted(used))
    conns = {case.messages[u].connection for u in used}
    own = [m.data for m in case.messages if m.connection in conns]
    return {m.connection for m in alert.messages} == {0} and [
        m.data for m in alert.messages
    ] == own[: len(alert.messages)]


@pytest.mark.parametrize("name", SAMPLES)
def test_variants_give_alerts_for_the_right_bytes(
    name: str, generated: Get, cases: dict[str, list[ExploitCase]]
) -> None:
    for i, case in enumerate(cases[name]):
        alert = generated(name, i).alert
        _same_bytes(alert, case)
        assert alert.type == traffic(name).EXPECTED_TYPE
        # Never anything that was not in the session, and the exploit's messages in order.
        datas = [m.data for m in case.messages]
        assert all(m.data in datas for m in alert.messages)
        if name in ("resolver", "rpcd", "mgmtd"):
            assert _minimal(alert, case), f"case {i}"


@pytest.mark.parametrize("name", TCP)
def test_an_exploit_sent_in_two_chunks_still_gives_a_minimal_alert(
    name: str,
    detectors: dict[str, Detector],
    verifier: Verifier,
    generated: Get,
    cases: dict[str, list[ExploitCase]],
    benign: dict[str, list[list[Message]]],
) -> None:
    for i, variant in enumerate(cases[name]):
        assert _minimal(generated(name, i).alert, variant), f"variant {i}"
    case = cases[name][0]
    data = case.messages[0].data
    last = max(r.offset for r in verification_refs(case.verification))
    cut = last + 13  # past the references (and a code-execution trap's 12 bytes)
    exploit = tuple(m for m in (Message(data[:cut], 0), Message(data[cut:], 0)) if m.data)
    g = _generate(detectors[name], verifier, _after(benign[name][0], exploit))
    assert g.alert.messages == exploit


@pytest.mark.parametrize("into_code", [1, 6, 11])
def test_code_near_a_chunk_end_still_gives_an_alert(
    into_code: int,
    detectors: dict[str, Detector],
    verifier: Verifier,
    cases: dict[str, list[ExploitCase]],
) -> None:
    case = cases["rpcd"][0]
    assert isinstance(case.verification, CodeExecution)
    data = case.messages[0].data
    cut = case.verification.code.offset + into_code
    messages = (Message(data[:cut], 0), Message(data[cut:], 0))
    run = detectors["rpcd"].inspect(messages)
    assert run.detection is not None, "the exploit is caught ..."
    g = detectors["rpcd"].generate(messages, run.detection, verifier)
    assert g is not None, "... so an alert must come out"


def test_a_long_log_still_gives_a_small_bounded_alert(
    detectors: dict[str, Detector], verifier: Verifier, cases: dict[str, list[ExploitCase]]
) -> None:
    rng = random.Random(4)
    log = MessageLog()
    for _ in range(40):
        for m in traffic("resolver").benign(rng):
            log.add(m)
    for m in cases["resolver"][3].messages:
        log.add(m)
    messages = log.messages()
    assert len(messages) > MAX_MESSAGES
    g = _generate(detectors["resolver"], verifier, messages)
    assert len(g.alert.messages) == 1
    assert decode_alert(encode_alert(g.alert)) == g.alert


# -- two detectors, one alert ------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_node() -> tuple[dict[str, Detector], Verifier]:
    """Another node: its own image loads, detectors and verifier (other sandboxes, nonces)."""
    images = {name: load_image(manifest_path(name)) for name in SAMPLES}
    return {n: Detector(img) for n, img in images.items()}, Verifier(list(images.values()))


@pytest.mark.parametrize("name", SAMPLES)
def test_two_detectors_write_byte_identical_alerts(
    name: str,
    generated: Get,
    cases: dict[str, list[ExploitCase]],
    second_node: tuple[dict[str, Detector], Verifier],
    benign: dict[str, list[list[Message]]],
) -> None:
    detectors2, verifier2 = second_node
    for i in range(6):
        mine = encode_alert(generated(name, i).alert)
        # The other node saw other benign traffic before the same exploit.
        theirs = _generate(
            detectors2[name], verifier2, _after(benign[name][10 + i], cases[name][i].messages)
        )
        assert encode_alert(theirs.alert) == mine, f"case {i}"
        assert alert_id(theirs.alert) == alert_id(mine)
        again = _generate(detectors2[name], verifier2, cases[name][i].messages)
        assert encode_alert(again.alert) == mine, f"case {i}"


def test_distinct_exploits_give_distinct_alerts(generated: Get) -> None:
    ids = {alert_id(generated(name, i).alert) for name in SAMPLES for i in range(6)}
    assert len(ids) == 4 * 6


# -- candidates --------------------------------------------------------------------------------
def test_candidates_go_from_small_to_large(cases: dict[str, list[ExploitCase]]) -> None:
    case = cases["httpd"][0]
    before = [Message(b"GET / HTTP/1.0\r\n\r\n", 0), Message(b"GET /a HTTP/1.0\r\n\r\n", 1)]
    messages = _after(before, case.messages)
    v = ExecutionControl(tuple(ByteRef(2, r.offset) for r in case.verification.target))  # type: ignore[attr-defined]
    out = list(candidates(messages, v))
    sizes = [len(m) for m, _ in out]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 3
    first_msgs, first_v = out[0]
    assert first_msgs == (Message(case.messages[0].data, 0),)
    assert first_v == case.verification
    # Execution-control: the longest run of target bytes first, then shorter ones.
    k = len(case.verification.target)  # type: ignore[attr-defined]
    lengths = [len(vv.target) for m, vv in out if len(m) == 1]  # type: ignore[union-attr]
    assert lengths == list(range(k, 0, -1))
    for msgs, vv in out:
        for r in verification_refs(vv):
            assert 0 <= r.message < len(msgs) and r.offset < len(msgs[r.message].data)
        assert msgs[0].connection == 0, "connections renumbered from 0"


def test_no_alert_when_nothing_verifies(
    detectors: dict[str, Detector],
    verifier: Verifier,
    benign: dict[str, list[list[Message]]],
) -> None:
    """A false detection (here: made up on benign traffic) produces no alert."""
    for name in SAMPLES:
        messages = tuple(benign[name][0])
        for v in (
            ExecutionControl((ByteRef(0, 0), ByteRef(0, 1))),
            CodeExecution(ByteRef(0, 0)),
            FunctionArgument("execve", 0, tuple(ByteRef(0, i) for i in range(4))),
        ):
            det = Detection(v, 0, "made up")
            assert detectors[name].generate(messages, det, verifier) is None


# -- the message log ---------------------------------------------------------------------------
def test_message_log_keeps_the_newest_within_its_count() -> None:
    log = MessageLog(max_messages=5, max_bytes=10**6)
    for i in range(12):
        log.add(Message(bytes([i]), None))
    assert len(log) == 5
    assert [m.data[0] for m in log.messages()] == [7, 8, 9, 10, 11]


def test_message_log_keeps_the_newest_within_its_bytes() -> None:
    log = MessageLog(max_messages=100, max_bytes=100)
    for i in range(10):
        log.add(Message(bytes([i]) * 30, i))
    assert [m.connection for m in log.messages()] == [7, 8, 9]
    assert sum(len(m.data) for m in log.messages()) <= 100
    log.add(Message(b"x" * 100, 10))
    assert [m.connection for m in log.messages()] == [10]


def test_message_log_drops_a_message_larger_than_its_bound() -> None:
    log = MessageLog(max_messages=10, max_bytes=64)
    log.add(Message(b"a", None))
    log.add(Message(b"b" * 65, None))
    assert len(log) == 0 and log.messages() == ()
    log.add(Message(b"c", None))
    assert log.messages() == (Message(b"c", None),)


def test_message_log_defaults_bound_memory() -> None:
    log = MessageLog()
    for _ in range(10_000):
        log.add(Message(b"z" * 1000, None))
    assert len(log) <= log.max_messages
    assert sum(len(m.data) for m in log.messages()) <= log.max_bytes
