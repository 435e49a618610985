"""Files that appear whole or not at all: a node's state (its neighbours' cache), what the CLI
writes for a person (alerts, envelopes, captures), the testbed registry's records."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, fsynced and then renamed
    over the old one: a failure half-way (a full disk, a signal) leaves the old file as it was
    and no temporary behind (``OSError``: report it with ``strerror`` and ``path``).

    A symlink is followed (its target is replaced, the link stays). ``mode``: the file's
    permissions (None: a replaced file keeps its own, a new one gets 0644 less the umask).
    What is not a regular file (a FIFO, a device such as /dev/stdout) is written into as
    asked, not replaced."""
    try:
        old = os.stat(path)  # through symlinks
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        with open(path, "wb") as f:
            f.write(data)
        return
    path = Path(os.path.realpath(path))  # a link's target is what gets replaced
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o644 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            if mode is not None or old is not None:
                os.fchmod(f.fileno(), mode if mode is not None else stat.S_IMODE(old.st_mode))
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
