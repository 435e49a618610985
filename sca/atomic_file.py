"""Files that appear whole or not at all: a node's state (its neighbours' cache), what the CLI
writes for a person (alerts, envelopes, captures), the testbed registry's records."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsynced and then renamed
    over the old one: a failure half-way (a full disk, a signal) leaves the old file as it was
    and no temporary behind (``OSError``: report it with ``strerror`` and ``path``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> str | None:
    """Why ``path`` cannot be written (its folder missing or read-only), or None: asked before
    long work whose result goes there."""
    folder = path.parent
    if not folder.is_dir():
        return f"cannot write {path}: no folder {folder}"
    if not os.access(folder, os.W_OK):
        return f"cannot write {path}: folder {folder} is not writable"
    if path.is_dir():
        return f"cannot write {path}: it is a folder"
    return None
