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


def test_a_symlink_stays_and_its_target_gets_the_data(tmp_path: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "secret.bin"
    path.write_bytes(b"old")
    path.chmod(0o600)
    write_atomic(path, b"new")  # no mode given: the file's own
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_fifo_is_written_into_not_replaced(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_atomic(fifo, b"through the pipe")
    reader.join(5)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
