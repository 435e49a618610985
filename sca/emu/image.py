"""Service images: a static x86-64 ELF plus its ``service.toml`` manifest."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_KEYS = ("name", "binary", "proto", "port")
MAX_BINARY_BYTES = 32 * 1024 * 1024
MAX_WARMUP_BYTES = 64 * 1024  # as much as an alert may carry in all


class ManifestError(ValueError):
    """A service manifest or its binary is unusable; the message says why."""


@dataclass(frozen=True, slots=True)
class ServiceImage:
    name: str
    proto: str
    port: int
    binary_path: Path
    binary: bytes
    # Optional ``warmup``: a benign request (one datagram, or what a client sends on one
    # connection) that a detector replays once when it starts.
    warmup: bytes = field(default=b"", repr=False)
    service_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashed once: it is asked for on every verification, and hashing a glibc-static
        # binary took 0.5 ms of each.
        object.__setattr__(self, "service_id", hashlib.sha256(self.binary).digest())


def load_image(manifest: str | Path) -> ServiceImage:
    path = Path(manifest)
    if path.is_dir():
        path = path / "service.toml"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML: {e}") from None
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise ManifestError(f"{path}: missing required key(s): {', '.join(missing)}")
    name, binary, proto, port = (doc[k] for k in REQUIRED_KEYS)
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ManifestError(f"{path}: 'name' must be a string of 1 to 64 characters")
    if not isinstance(binary, str) or not binary:
        raise ManifestError(f"{path}: 'binary' must be a path relative to the manifest")
    if proto not in ("udp", "tcp"):
        raise ManifestError(f"{path}: 'proto' must be \"udp\" or \"tcp\", not {proto!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ManifestError(f"{path}: 'port' must be an integer from 1 to 65535")
    bin_path = (path.parent / binary).resolve()
    try:
        size = bin_path.stat().st_size
        if size > MAX_BINARY_BYTES:
            raise ManifestError(f"{bin_path}: binary larger than {MAX_BINARY_BYTES} bytes")
        data = bin_path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read binary {bin_path}: {e.strerror}") from None
    return ServiceImage(name=name, proto=proto, port=port, binary_path=bin_path, binary=data,
                        warmup=_warmup(path, doc.get("warmup")))


def _warmup(manifest: Path, value: object) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{manifest}: 'warmup' must be a path relative to the manifest")
    file = (manifest.parent / value).resolve()
    try:
        if file.stat().st_size > MAX_WARMUP_BYTES:
            raise ManifestError(f"{manifest}: 'warmup' file {file} is larger than "
                                f"{MAX_WARMUP_BYTES} bytes")
        return file.read_bytes()
    except OSError as e:
        raise ManifestError(f"{manifest}: cannot read 'warmup' file {file}: {e.strerror}") \
            from None
