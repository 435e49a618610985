"""The emulator sandbox (sca.emu): boots, benign replies, flash-clone independence, budgets
against hostile services, and the ELF loader's and manifest reader's refusals.

The hostile services are test-only static binaries in ``tests/sca/data`` (built by its
``build.sh``); like the samples they only ever run inside the emulator.
"""

from __future__ import annotations

import random
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from sca.alert import Message
from sca.emu.elf import parse_executable
from sca.emu.image import ManifestError, ServiceImage, load_image
from sca.emu.kernel import MAX_FDS, MAX_SENDS
from sca.emu.sandbox import Budget, Outcome, Sandbox, SandboxError
from sca.services import SAMPLES, traffic

DATA = Path(__file__).resolve().parent / "data"
ENOSYS, EMFILE, ENOMEM = 38, 24, 12


# -- what a benign request should get back ------------------------------------------------------
def _resolver_replies(messages: list[Message]) -> int:
    known = {n.lower() for n in traffic("resolver").KNOWN_INSTANCES}
    count = 0
    for m in messages:
        kind = m.data[0]
        if kind in (0x02, 0x03, 0x0A):
            count += 1
        elif kind == 0x04:
            name = m.data[1:].split(b"\0")[0].decode().lower()
            count += name in known
    return count


def _streams(messages: list[Message]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for m in messages:
        assert m.connection is not None
        out[m.connection] = out.get(m.connection, b"") + m.data
    return out


def _rpcd_replies(stream: bytes) -> int:
    count = 0
    while stream:
        flags, length = stream[3], struct.unpack_from("<H", stream, 4)[0]
        count += not flags & 0x01
        stream = stream[8 + length :]
    return count


def _mgmtd_replies(stream: bytes) -> int:
    commands = traffic("mgmtd").COMMANDS
    count = 0
    for line in stream.split(b"\n")[:-1]:
        words = line.rstrip(b"\r").decode().split(" ")
        if words[0] == "RUN" and len(words) > 1 and words[1] in commands:
            count += 2  # "OK <tag> started", then "ERR <tag> exec failed" (execve is refused)
        else:
            count += 1
        if words[0] == "QUIT":
            break
    return count


# -- boot and benign traffic -------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_boots_to_its_first_receive(name: str, sandboxes: dict[str, Sandbox]) -> None:
    sb = sandboxes[name]
    result = sb.run([])
    assert result.outcome == Outcome.BLOCKED
    assert result.sent == []
    assert not any(r.name in ("execve", "fork", "unknown") for r in sb.boot_io.records)


@pytest.mark.parametrize("name", SAMPLES)
def test_benign_traffic_gets_the_expected_replies(
    name: str, sandboxes: dict[str, Sandbox], benign: dict[str, list[list[Message]]]
) -> None:
    sb = sandboxes[name]
    for messages in benign[name]:
        result = sb.run(messages)
        assert result.outcome == Outcome.BLOCKED, (messages, result.fault)
        assert all(data for _conn, data in result.sent), "an empty send"
        per_conn = Counter(conn for conn, _data in result.sent)
        if name == "resolver":
            assert len(result.sent) == _resolver_replies(messages) >= 1
            for _conn, data in result.sent:
                assert data[0] in (0x05, 0x0A)
            continue
        for conn, stream in _streams(messages).items():
            if name == "httpd":
                replies = [d for c, d in result.sent if c == conn]
                assert replies and replies[0].startswith(b"HTTP/1.0 "), stream
            elif name == "rpcd":
                assert per_conn[conn] == _rpcd_replies(stream) >= 1, stream
            else:
                assert per_conn[conn] == _mgmtd_replies(stream) >= 1, stream


@pytest.mark.parametrize("name", SAMPLES)
def test_same_input_twice_gives_the_same_sends(
    name: str, sandboxes: dict[str, Sandbox], benign: dict[str, list[list[Message]]]
) -> None:
    sb = sandboxes[name]
    for messages in benign[name][:10]:
        first = sb.run(messages)
        second = sb.run(messages)
        assert (first.outcome, first.sent) == (second.outcome, second.sent)


@pytest.mark.parametrize("name", SAMPLES)
def test_an_exploit_leaves_nothing_behind_for_the_next_run(
    name: str, sandboxes: dict[str, Sandbox], benign: dict[str, list[list[Message]]]
) -> None:
    """A run that smashes the stack (and exits or faults) is gone in the next clone."""
    sb = sandboxes[name]
    messages = benign[name][3]
    before = sb.run(messages)
    smashed = sb.run(traffic(name).exploit())
    assert smashed.outcome != Outcome.BLOCKED or smashed.execves()
    after = sb.run(messages)
    assert (after.outcome, after.sent) == (before.outcome, before.sent)


def test_kernel_state_is_restored_between_runs(hostile_image: ServiceImage) -> None:
    """Heap growth and open descriptors of one run are gone in the next: the hostile service
    reports the same amounts of memory and sockets every time."""
    sb = Sandbox(hostile_image, Budget(memory=2 << 20))
    mem = [sb.run([Message(b"M")]).sent for _ in range(3)]
    fds = [sb.run([Message(b"D")]).sent for _ in range(3)]
    assert mem[0] == mem[1] == mem[2] and mem[0]
    assert fds[0] == fds[1] == fds[2] and fds[0]


def test_restore_is_independent_of_an_interrupted_run(hostile_image: ServiceImage) -> None:
    sb = Sandbox(hostile_image, Budget(instructions=200_000))
    echo = sb.run([Message(b"Ehello")])
    assert echo.sent == [(None, b"Ehello")]
    assert sb.run([Message(b"L")]).outcome == Outcome.BUDGET
    assert sb.run([Message(b"Ehello")]).sent == echo.sent


# -- budgets against a hostile service ---------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(hostile_image: ServiceImage) -> Sandbox:
    return Sandbox(hostile_image, Budget(instructions=2_000_000, memory=2 << 20, wall_ms=300))


def _timed(sb: Sandbox, data: bytes, budget: Budget | None = None):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = sb.run([Message(data)], budget=budget)
    return result, time.perf_counter() - start


def test_endless_loop_ends_on_the_instruction_budget(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"L", Budget(instructions=1_000_000, wall_ms=60_000))
    assert result.outcome == Outcome.BUDGET
    assert took < 2.0


def test_endless_syscalls_end_on_the_wall_budget(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"Y", Budget(instructions=10**12, wall_ms=200))
    assert result.outcome == Outcome.BUDGET
    assert 0.2 <= took < 1.5


def test_memory_grower_is_refused_with_enomem_and_goes_on(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"M")
    assert result.outcome == Outcome.BLOCKED, "the service handled ENOMEM and carried on"
    assert len(result.sent) == 1
    tag, brk_bytes, mmap_bytes, err = result.sent[0][1].split()
    assert tag == b"M"
    half = (2 << 20) // 2
    assert 0 < int(brk_bytes) <= half
    assert 0 < int(mmap_bytes) <= half
    assert int(err) == ENOMEM
    assert took < 2.0


def test_fork_execve_storm_is_recorded_bounded_and_stopped(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"F")
    assert result.outcome == Outcome.BUDGET
    names = Counter(r.name for r in result.records)
    assert names["fork"] > 10 and names["execve"] > 10
    assert set(names) == {"fork", "execve"}
    assert len(result.records) <= 1024, "the record must be bounded"
    assert all(r.args == (b"/bin/sh", (b"/bin/sh",)) for r in result.records if r.name == "execve")
    assert took < 2.0


def test_unknown_syscalls_are_recorded_and_fail_with_enosys(hostile: Sandbox) -> None:
    result, _ = _timed(hostile, b"U")
    assert result.outcome == Outcome.BLOCKED
    assert [(r.name, r.args) for r in result.records] == [
        ("unknown", (n,)) for n in (1000, 1001, 1002, 1003, 335)
    ]
    assert result.sent == [(None, b"U" + f" -{ENOSYS}".encode() * 5)]


def test_descriptor_exhaustion_is_bounded(hostile: Sandbox) -> None:
    result, _ = _timed(hostile, b"D")
    assert result.outcome == Outcome.BLOCKED
    tag, count, err = result.sent[0][1].split()
    assert tag == b"D" and int(err) == EMFILE
    assert 0 < int(count) < MAX_FDS


def test_endless_recursion_faults(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"R")
    assert result.outcome == Outcome.FAULT
    assert result.fault
    assert took < 2.0


def test_endless_sends_are_kept_bounded(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"W")
    assert result.outcome == Outcome.BUDGET
    assert 0 < len(result.sent) <= MAX_SENDS
    assert took < 2.0


def test_hostile_messages_never_crash_the_sandbox(hostile: Sandbox) -> None:
    """Random datagrams and every command in a row: each run ends with an outcome, and the
    next clone still serves a well-behaved request."""
    rng = random.Random(5)
    sessions = [
        [Message(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))] for _ in range(50)
    ]
    sessions.append([Message(c) for c in (b"E1", b"U", b"D", b"M", b"E2", b"R")])
    for messages in sessions:
        result = hostile.run(messages)
        assert isinstance(result.outcome, Outcome)
        assert hostile.run([Message(b"Eok")]).sent == [(None, b"Eok")]
    assert result.outcome == Outcome.FAULT
    assert [d for _c, d in result.sent][:1] == [b"E1"]


def test_wall_budget_holds_for_a_page_toucher(hostile_image: ServiceImage) -> None:
    """A heap of 8 MiB touched page by page without a syscall (first writes after the snapshot
    are slow in unicorn): the wall budget still ends the run in time."""
    sb = Sandbox(hostile_image, Budget(instructions=50_000_000, memory=16 << 20, wall_ms=100))
    _result, took = _timed(sb, b"P")
    assert took < 0.6, f"a 100 ms wall budget took {took:.2f} s"


def test_wall_budget_holds_for_a_static_buffer_toucher() -> None:
    sb = Sandbox(load_image(DATA / "bigbss.toml"), Budget(instructions=50_000_000, wall_ms=100))
    _result, took = _timed(sb, b"x")
    assert took < 1.0, f"a 100 ms wall budget took {took:.2f} s"


def test_a_call_to_null_is_a_fault(hostile: Sandbox) -> None:
    result, took = _timed(hostile, b"N")
    assert took < 1.0
    assert (result.outcome, result.fetch_address) == (Outcome.FAULT, 0)


# -- boot refusals -----------------------------------------------------------------------------
def _image(tmp_path: Path, binary: str, proto: str = "udp") -> Path:
    shutil.copy(DATA / "bin" / binary, tmp_path / binary)
    manifest = tmp_path / "service.toml"
    manifest.write_text(f'name = "t"\nbinary = "{binary}"\nproto = "{proto}"\nport = 9\n')
    return manifest


def test_a_service_that_exits_before_receiving_is_refused(tmp_path: Path) -> None:
    image = load_image(_image(tmp_path, "exit-at-boot"))
    with pytest.raises(SandboxError, match="did not reach its first receive"):
        Sandbox(image)


# -- the ELF loader ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("binary", "why"),
    [
        ("dynamic", "dynamically linked"),
        ("pie", "non-PIE"),
        ("i386", "x86-64"),
    ],
)
def test_loader_refuses_unsuitable_binaries(binary: str, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        parse_executable((DATA / "bin" / binary).read_bytes())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"#!/bin/sh\necho hi\n",
        b"\x7fELF",
        b"\x7fELF\x02\x01\x01" + bytes(57),
        bytes(range(256)) * 4,
    ],
)
def test_loader_refuses_non_elf(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_executable(data)


def test_loader_refuses_truncated_elf() -> None:
    whole = (DATA / "bin" / "hostile").read_bytes()
    for cut in (16, 64, 100, 200):
        with pytest.raises(ManifestError):
            parse_executable(whole[:cut])


def test_loader_refuses_segments_outside_the_loadable_range() -> None:
    data = bytearray((DATA / "bin" / "hostile").read_bytes())
    phoff, phentsize = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 54)[0]
    phnum = struct.unpack_from("<H", data, 56)[0]
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from("<I", data, at)[0] == 1:  # PT_LOAD: move it onto page 0
            struct.pack_into("<Q", data, at + 16, 0x1000)
            break
    with pytest.raises(ManifestError, match="loadable range"):
        parse_executable(bytes(data))


@pytest.mark.parametrize("binary", ["dynamic", "pie", "i386"])
def test_load_then_boot_refuses_unsuitable_binaries(tmp_path: Path, binary: str) -> None:
    image = load_image(_image(tmp_path, binary))  # the manifest itself is fine
    with pytest.raises(ManifestError):
        Sandbox(image)


# -- manifests ---------------------------------------------------------------------------------
GOOD = {"name": '"t"', "binary": '"hostile"', "proto": '"udp"', "port": "9999"}


def _manifest(tmp_path: Path, fields: dict[str, str]) -> Path:
    shutil.copy(DATA / "bin" / "hostile", tmp_path / "hostile")
    path = tmp_path / "service.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    return path


def test_good_manifest_loads(tmp_path: Path) -> None:
    image = load_image(_manifest(tmp_path, GOOD))
    assert (image.name, image.proto, image.port) == ("t", "udp", 9999)
    assert len(image.service_id) == 32
    assert image.binary == (DATA / "bin" / "hostile").read_bytes()
    assert load_image(tmp_path) == image, "a folder means its service.toml"


def test_extra_keys_are_allowed(tmp_path: Path) -> None:
    image = load_image(_manifest(tmp_path, {**GOOD, "description": '"x"', "extra": "1"}))
    assert image.name == "t"


def test_warmup_request_is_loaded_and_checked(tmp_path: Path) -> None:
    (tmp_path / "benign.bin").write_bytes(b"\x04ARCHIVE\x00")
    image = load_image(_manifest(tmp_path, {**GOOD, "warmup": '"benign.bin"'}))
    assert image.warmup == b"\x04ARCHIVE\x00"
    assert load_image(_manifest(tmp_path, GOOD)).warmup == b""  # optional
    with pytest.raises(ManifestError, match="cannot read 'warmup' file"):
        load_image(_manifest(tmp_path, {**GOOD, "warmup": '"missing.bin"'}))
    with pytest.raises(ManifestError, match="'warmup' must be a path"):
        load_image(_manifest(tmp_path, {**GOOD, "warmup": "3"}))
    (tmp_path / "big.bin").write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(ManifestError, match=r"'warmup' file .* is larger than"):
        load_image(_manifest(tmp_path, {**GOOD, "warmup": '"big.bin"'}))


@pytest.mark.parametrize("key", sorted(GOOD))
def test_missing_key_is_named(tmp_path: Path, key: str) -> None:
    fields = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ManifestError, match=f"missing required key.*{key}"):
        load_image(_manifest(tmp_path, fields))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("name", "7", "'name' must be a string"),
        ("name", '""', "'name' must be a string"),
        ("name", '"' + "n" * 65 + '"', "'name' must be a string"),
        ("binary", "1", "'binary' must be a path"),
        ("binary", "[]", "'binary' must be a path"),
        ("proto", '"sctp"', "'proto' must be"),
        ("proto", "1", "'proto' must be"),
        ("port", '"80"', "'port' must be an integer"),
        ("port", "0", "'port' must be an integer"),
        ("port", "65536", "'port' must be an integer"),
        ("port", "true", "'port' must be an integer"),
        ("port", "8.5", "'port' must be an integer"),
    ],
)
def test_mistyped_key_is_explained(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_image(_manifest(tmp_path, {**GOOD, key: value}))


def test_unreadable_manifests_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        load_image(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_image(bad)
    bad.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_image(bad)
    with pytest.raises(ManifestError, match="cannot read binary"):
        load_image(_manifest(tmp_path, {**GOOD, "binary": '"missing"'}))
