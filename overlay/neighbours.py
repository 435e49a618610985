"""The neighbour cache: a JSON file so a restarted node rejoins without its bootstrap peers.

Replaces the library's pickle state (``Server.save_state``), which would run code from the
file. The file is ``<state dir>/neighbours.json``::

    {"version": 1, "node_id": "<hex>", "saved_at": <unix seconds>,
     "neighbours": [{"id": "<40 hex>", "host": "<IP literal>", "port": <1..65535>}, ...]}

Writes are atomic (temporary file, fsync, rename). Reading is strict and never fatal: a file
that is too big, not JSON, or has a bad entry anywhere yields no neighbours and a warning (the
node then needs its bootstrap peers, which is what it would need without a cache). Ids in the
cache are hints only: every neighbour is authenticated by hello again before it is used.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sca.atomic_file import write_atomic

log = logging.getLogger(__name__)

FILE_NAME = "neighbours.json"
VERSION = 1
MAX_NEIGHBOURS = 64
MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Neighbour:
    node_id: bytes
    host: str
    port: int


class NeighbourFileError(ValueError):
    pass


def save(state_dir: Path, node_id: bytes, neighbours: list[Neighbour]) -> Path:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / FILE_NAME
    doc = {
        "version": VERSION,
        "node_id": node_id.hex(),
        "saved_at": round(time.time(), 3),
        "neighbours": [{"id": n.node_id.hex(), "host": n.host, "port": n.port}
                       for n in neighbours[:MAX_NEIGHBOURS]],
    }
    write_atomic(path, json.dumps(doc, indent=1).encode(), 0o600)
    return path


def parse(text: str) -> list[Neighbour]:
    """The neighbours in a cache file's text; ``NeighbourFileError`` for anything off."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise NeighbourFileError(f"not JSON: {exc}") from None
    if type(doc) is not dict or doc.get("version") != VERSION:
        raise NeighbourFileError("not a version 1 neighbour cache")
    raw = doc.get("neighbours")
    if type(raw) is not list or len(raw) > MAX_NEIGHBOURS:
        raise NeighbourFileError(f"neighbours must be a list of at most {MAX_NEIGHBOURS}")
    out: list[Neighbour] = []
    for i, item in enumerate(raw):
        if type(item) is not dict or set(item) != {"id", "host", "port"}:
            raise NeighbourFileError(f"entry {i}: expected id, host and port")
        node_id, host, port = item["id"], item["host"], item["port"]
        try:
            if type(node_id) is not str or len(node_id) != 40:
                raise ValueError("id")
            ident = bytes.fromhex(node_id)
            if type(host) is not str or len(host) > 45:
                raise ValueError("host")
            ipaddress.ip_address(host)
            if type(port) is not int or not 0 < port <= 0xFFFF:
                raise ValueError("port")
        except ValueError:
            raise NeighbourFileError(f"entry {i}: bad id, host or port") from None
        out.append(Neighbour(ident, host, port))
    return out


def load(state_dir: Path) -> list[Neighbour]:
    """The cached neighbours, or [] (with a warning if a file was there but unusable)."""
    path = state_dir / FILE_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("neighbour cache %s unreadable (%s); ignoring it", path, exc.strerror)
        return []
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        log.warning("neighbour cache %s unreadable (%s); ignoring it", path, exc.strerror)
        return []
    if len(data) > MAX_FILE_BYTES:
        log.warning("neighbour cache %s is over %d bytes; ignoring it", path, MAX_FILE_BYTES)
        return []
    try:
        return parse(data.decode("utf-8"))
    except (NeighbourFileError, UnicodeDecodeError) as exc:
        log.warning("neighbour cache %s ignored: %s", path, exc)
        return []
