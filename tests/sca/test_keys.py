"""sca.keys: node keys on disk, node ids, signatures."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey

from sca.keys import (
    KEY_FILE,
    KeyFileError,
    NodeKey,
    default_state_dir,
    node_id_of,
    verify_signature,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_node_id_is_first_20_bytes_of_sha256_of_public_key() -> None:
    key = NodeKey.generate()
    assert len(key.public_bytes) == 32
    assert key.node_id == hashlib.sha256(key.public_bytes).digest()[:20]
    assert node_id_of(key.public_bytes) == key.node_id
    assert NodeKey.generate().node_id != key.node_id


def test_sign_and_verify() -> None:
    key = NodeKey.generate()
    sig = key.sign(b"data")
    assert len(sig) == 64
    assert verify_signature(key.public_bytes, sig, b"data")
    assert not verify_signature(key.public_bytes, sig, b"datA")
    assert not verify_signature(NodeKey.generate().public_bytes, sig, b"data")
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(key.public_bytes, bad, b"data")


@pytest.mark.parametrize("public,sig", [
    (b"\x00" * 31, b"\x00" * 64),
    (b"\x00" * 32, b"\x00" * 63),
    (b"\xff" * 32, b"\x00" * 64),  # not a valid curve point
    ("text", b"\x00" * 64),
    (b"\x00" * 32, None),
])
def test_verify_never_raises_on_hostile_input(public: object, sig: object) -> None:
    assert verify_signature(public, sig, b"data") is False  # type: ignore[arg-type]


def test_fixed_seed_gives_fixed_key() -> None:
    a = NodeKey.from_private_bytes(bytes(range(32)))
    b = NodeKey.from_private_bytes(bytes(range(32)))
    assert a.public_bytes == b.public_bytes
    assert "NodeKey(node_id=" in repr(a) and bytes(range(32)).hex() not in repr(a)


def test_save_writes_0600_and_loads_back(tmp_path: Path) -> None:
    key = NodeKey.generate()
    old = os.umask(0)  # even with a permissive umask the key must be private
    try:
        path = key.save(tmp_path / "state")
    finally:
        os.umask(old)
    assert path == tmp_path / "state" / KEY_FILE
    assert mode_of(path) == 0o600
    assert mode_of(tmp_path / "state") == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = NodeKey.load(tmp_path / "state")
    assert loaded.public_bytes == key.public_bytes
    assert verify_signature(key.public_bytes, loaded.sign(b"x"), b"x")
    # No temporary files left behind.
    assert [p.name for p in (tmp_path / "state").iterdir()] == [KEY_FILE]


def test_save_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = NodeKey.generate()
    first.save(tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        NodeKey.generate().save(tmp_path)
    assert NodeKey.load(tmp_path).public_bytes == first.public_bytes
    second = NodeKey.generate()
    second.save(tmp_path, force=True)
    assert NodeKey.load(tmp_path).public_bytes == second.public_bytes
    assert mode_of(tmp_path / KEY_FILE) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o602])
def test_load_refuses_key_readable_or_writable_by_others(tmp_path: Path, mode: int) -> None:
    path = NodeKey.generate().save(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        NodeKey.load(tmp_path)
    assert f"chmod 600 {path}" in str(info.value)
    os.chmod(path, 0o600)
    NodeKey.load(tmp_path)
    os.chmod(path, 0o400)  # read-only for the owner is fine too
    NodeKey.load(tmp_path)


def test_load_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="herdwall keygen"):
        NodeKey.load(tmp_path)


@pytest.mark.parametrize("content", [
    b"",
    b"not a key",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    os.urandom(200),
])
def test_load_refuses_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="corrupt"):
        NodeKey.load(tmp_path)


def test_load_refuses_other_key_types_and_huge_files(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(Ed448PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        NodeKey.load(tmp_path)
    path.write_bytes(b"x" * 100_000)
    with pytest.raises(KeyFileError, match="too large"):
        NodeKey.load(tmp_path)


def test_load_refuses_symlinks_and_directories(tmp_path: Path) -> None:
    real = NodeKey.generate().save(tmp_path / "real")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / KEY_FILE).symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot open"):
        NodeKey.load(tmp_path / "link")
    (tmp_path / "dir" / KEY_FILE).mkdir(parents=True)
    with pytest.raises(KeyFileError, match="not a regular file"):
        NodeKey.load(tmp_path / "dir")


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERDWALL_STATE_DIR", str(tmp_path))
    assert default_state_dir() == tmp_path
    key = NodeKey.generate()
    key.save()
    assert NodeKey.load().public_bytes == key.public_bytes
    monkeypatch.delenv("HERDWALL_STATE_DIR")
    if os.geteuid() == 0:
        assert default_state_dir() == Path("/var/lib/herdwall")
    else:
        assert default_state_dir() == Path.home() / ".local" / "state" / "herdwall"
