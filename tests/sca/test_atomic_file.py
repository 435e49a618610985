"""Files written whole or not at all."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sca.atomic_file import check_writable, write_atomic


def test_a_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    write_atomic(path, b"new contents", 0o600)
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_what_cannot_be_written_is_said_before(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a.bin") is None
    assert "no folder" in (check_writable(tmp_path / "missing" / "a.bin") or "")
    assert "is a folder" in (check_writable(tmp_path) or "")
