"""The node's store: one SQLite file in WAL mode.

What it holds (schema version ``SCHEMA_VERSION``, in ``PRAGMA user_version``; the file is marked
as herdwall's with ``PRAGMA application_id``):

- ``alerts``: one row per alert id: the canonical alert bytes, the signed envelope as received
  or as we signed it, service, type, signer, origin (detected here, from the overlay, imported),
  who we got it from, state (received / verified / refuted / forwarded) and why;
- ``verifications``: every verdict our own sandbox gave, with the reason and the time it took;
- ``packets``: the raw IP packets that carried a detected alert's messages (for traceback);
- ``filters``: the filter JSON (``Filter.to_json``), the alert it came from, its state
  (installed / removed / expired) and who removed it: an operator's removal is remembered so
  the same filter does not come back unasked when the alert is seen again;
- ``peers``, ``events`` (pruned to the newest N), ``throttle_flags``.

Durability: every write is one transaction (``with self._tx()``) committed before the method
returns: what a method acknowledged survives kill -9 of the node. The WAL runs with
``synchronous=NORMAL``: a commit is written to the WAL but not fsynced (fsync is at
checkpoints), which costs about 0.1 ms instead of about 8 ms on this disk, on the path of every
relayed alert. A power cut may therefore lose the last commits (never corrupt the file); the
next start repairs what matters: the kernel is reconciled with the store, and alerts come
back through the overlay's anti-entropy. ``Store(durable=True)`` (FULL) for tools that want
every commit on disk.
Hostile or corrupt files are refused with ``StoreError`` naming the file and what to do, never a
traceback: a file that is not SQLite, SQLite that is not ours, a schema from a newer herdwall,
or a failed integrity check.

The store is synchronous and single-threaded; the daemon runs it on one dedicated thread
(``StoreRunner``), so the event loop never waits on an fsync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 1
APPLICATION_ID = 0x68657264  # "herd"
SQLITE_MAGIC = b"SQLite format 3\0"
MAX_PACKETS_PER_ALERT = 256
MAX_PACKET_BYTES = 65535

ALERT_STATES = ("received", "verified", "refuted", "forwarded")
FILTER_STATES = ("installed", "removed", "expired")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE alerts (
    alert_id    TEXT PRIMARY KEY,
    service_id  TEXT NOT NULL,
    service     TEXT NOT NULL,
    type        TEXT NOT NULL,
    alert       BLOB NOT NULL,
    envelope    BLOB,
    signer      TEXT,
    signed_at   REAL,
    origin      TEXT NOT NULL CHECK (origin IN ('detected', 'overlay', 'import')),
    from_peer   TEXT,
    state       TEXT NOT NULL CHECK (state IN ('received', 'verified', 'refuted', 'forwarded')),
    reason      TEXT NOT NULL DEFAULT '',
    first_seen  REAL NOT NULL,
    updated     REAL NOT NULL,
    seen_count  INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX alerts_by_time ON alerts (first_seen);
CREATE TABLE verifications (
    id          INTEGER PRIMARY KEY,
    alert_id    TEXT NOT NULL,
    verified    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    elapsed_ms  REAL NOT NULL,
    at          REAL NOT NULL
);
CREATE INDEX verifications_by_alert ON verifications (alert_id);
CREATE TABLE packets (
    alert_id    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    packet      BLOB NOT NULL,
    PRIMARY KEY (alert_id, seq)
);
CREATE TABLE filters (
    filter_id   TEXT PRIMARY KEY,
    alert_id    TEXT,
    service_id  TEXT NOT NULL,
    service     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    proto       TEXT NOT NULL,
    port        INTEGER NOT NULL,
    json        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('installed', 'removed', 'expired')),
    removed_by  TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    expires     REAL
);
CREATE TABLE peers (
    node_id     TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL
);
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    type        TEXT NOT NULL,
    json        TEXT NOT NULL
);
CREATE TABLE throttle_flags (
    host        TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('flagged', 'cleared')),
    flagged_at  REAL NOT NULL,
    cleared_at  REAL,
    detail      TEXT NOT NULL DEFAULT ''
);
"""


class StoreError(RuntimeError):
    """The store file cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class AlertRow:
    alert_id: str
    service_id: str
    service: str
    type: str
    alert: bytes
    envelope: bytes | None
    signer: str | None
    signed_at: float | None
    origin: str
    from_peer: str | None
    state: str
    reason: str
    first_seen: float
    updated: float
    seen_count: int

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("alert", "envelope")}
        d["alert_bytes"] = len(self.alert)
        d["has_envelope"] = self.envelope is not None
        return d


@dataclass(frozen=True)
class FilterRow:
    filter_id: str
    alert_id: str | None
    service_id: str
    service: str
    kind: str
    proto: str
    port: int
    json: str
    state: str
    removed_by: str | None
    created: float
    updated: float
    expires: float | None

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "json"}
        try:
            d["words"] = json.loads(self.json).get("words", [])
        except (ValueError, AttributeError):
            d["words"] = []
        return d


@dataclass(frozen=True)
class Verification:
    alert_id: str
    verified: bool
    reason: str
    detail: str
    elapsed_ms: float
    at: float


def _check_file(path: Path) -> None:
    """Refuse, before SQLite sees it, a path that is not a regular file or not SQLite."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot read store {path}: {e.strerror}") from None
    import stat as st_mod

    if not st_mod.S_ISREG(st.st_mode):
        raise StoreError(f"store {path} is not a regular file; move it away")
    if st.st_size == 0:
        return  # an empty file is a new database to SQLite
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"cannot read store {path}: {e.strerror}") from None
    if head != SQLITE_MAGIC:
        raise StoreError(f"store {path} is not an SQLite database (corrupt or not ours); "
                         "move it away and the node starts a new one")


class Store:
    """One connection to the store. ``create=False`` refuses a missing file (the CLI reading a
    node's store must not create an empty one somewhere else)."""

    def __init__(self, path: Path | str, *, create: bool = True, check: bool = True,
                 durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        _check_file(self.path)
        if not create and not self.path.exists():
            raise StoreError(f"no store at {self.path} (has a node run with this state "
                             "directory?)")
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in _tx), so a
            # write never sits uncommitted behind an implicit transaction.
            self._db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        try:
            self._setup(create, check)
        except sqlite3.OperationalError as e:
            # An I/O error, a full disk, a lock held too long: the file may be fine, so no
            # advice to discard it.
            self._db.close()
            raise StoreError(f"cannot use store {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(f"store {self.path} is corrupt or not a herdwall store ({e}); "
                             "move it away and the node starts a new one") from None
        except StoreError:
            self._db.close()
            raise

    def _setup(self, create: bool, check: bool) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 10000")
        app = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app == 0 and version == 0 and tables == 0:
            if not create:
                raise StoreError(f"store {self.path} is empty")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {self.path}: cannot use WAL mode ({mode})")
            with self._tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif app != APPLICATION_ID:
            raise StoreError(f"store {self.path} is an SQLite database but not a herdwall "
                             "store; move it away or point state_dir elsewhere")
        elif version > SCHEMA_VERSION:
            raise StoreError(f"store {self.path} has schema version {version}, newer than "
                             f"this herdwall's {SCHEMA_VERSION}; upgrade herdwall")
        elif version < SCHEMA_VERSION:
            self._migrate(version)
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        db.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA trusted_schema = OFF")  # a hostile file's views/triggers stay inert
        if check:
            result = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if result != "ok":
                raise StoreError(f"store {self.path} failed its integrity check ({result}); "
                                 "move it away and the node starts a new one")
        missing = {"alerts", "verifications", "packets", "filters", "peers", "events",
                   "throttle_flags"} - {r[0] for r in db.execute(
                       "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if missing:
            raise StoreError(f"store {self.path} lacks tables {sorted(missing)}; "
                             "move it away and the node starts a new one")

    def _migrate(self, version: int) -> None:
        # Version 1 is the first; a later schema adds its steps here, one transaction each.
        raise StoreError(f"store {self.path} has schema version {version}, which this "
                         "herdwall cannot upgrade")

    @property
    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: two writers (daemon and CLI) wait on
        # busy_timeout instead of failing half way with SQLITE_BUSY on upgrade.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- alerts ---------------------------------------------------------------------------

    def record_alert(self, *, alert_id: str, service_id: str, service: str, type: str,
                     alert: bytes, origin: str, state: str, reason: str = "",
                     envelope: bytes | None = None, signer: str | None = None,
                     signed_at: float | None = None, from_peer: str | None = None,
                     packets: Sequence[bytes] = (),
                     verification: tuple[bool, str, str, float] | None = None,
                     now: float | None = None) -> bool:
        """Insert an alert, or update the known one (state, reason; the envelope and signer if
        we had none, or had only a badly signed one), with our sandbox's ``verification``
        (verified, reason, detail, ms) in the same transaction. Returns True if it was new."""
        now = time.time() if now is None else now
        if state not in ALERT_STATES:
            raise ValueError(f"bad alert state {state!r}")
        with self._tx() as db:
            row = db.execute("SELECT state, envelope, reason FROM alerts WHERE alert_id = ?",
                             (alert_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO alerts (alert_id, service_id, service, type, alert, envelope,"
                    " signer, signed_at, origin, from_peer, state, reason, first_seen, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (alert_id, service_id, service, type, alert, envelope, signer, signed_at,
                     origin, from_peer, state, reason, now, now))
                new = True
            else:
                replace_env = envelope is not None and (row[1] is None
                                                        or row[2] == "bad-signature")
                db.execute(
                    "UPDATE alerts SET state = ?, reason = ?, updated = ?,"
                    " seen_count = seen_count + 1,"
                    " envelope = CASE WHEN ? THEN ? ELSE envelope END,"
                    " signer = CASE WHEN ? THEN ? ELSE signer END,"
                    " signed_at = CASE WHEN ? THEN ? ELSE signed_at END,"
                    " from_peer = COALESCE(from_peer, ?) WHERE alert_id = ?",
                    (state, reason, now, replace_env, envelope, replace_env, signer,
                     replace_env, signed_at, from_peer, alert_id))
                new = False
            for seq, p in enumerate(packets[:MAX_PACKETS_PER_ALERT]):
                db.execute("INSERT OR IGNORE INTO packets (alert_id, seq, packet) "
                           "VALUES (?, ?, ?)", (alert_id, seq, bytes(p[:MAX_PACKET_BYTES])))
            if verification is not None:
                ok, why, detail, ms = verification
                db.execute("INSERT INTO verifications (alert_id, verified, reason, detail,"
                           " elapsed_ms, at) VALUES (?, ?, ?, ?, ?, ?)",
                           (alert_id, int(ok), why, detail[:1000], ms, now))
        return new

    def set_alert_state(self, alert_id: str, state: str, reason: str | None = None,
                        now: float | None = None) -> None:
        if state not in ALERT_STATES:
            raise ValueError(f"bad alert state {state!r}")
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("UPDATE alerts SET state = ?, reason = COALESCE(?, reason), updated = ?"
                       " WHERE alert_id = ?", (state, reason, now, alert_id))

    def alert(self, alert_id: str) -> AlertRow | None:
        row = self._db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE alert_id = ?",
                               (alert_id,)).fetchone()
        return AlertRow(*row) if row else None

    def find_alert(self, prefix: str) -> AlertRow | None:
        """The alert whose id starts with ``prefix`` (hex, at least 4 characters); ValueError if
        the prefix is ambiguous."""
        p = prefix.lower()
        if len(p) < 4 or any(c not in "0123456789abcdef" for c in p):
            raise ValueError("an alert id is hex, at least 4 characters")
        rows = self._db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE alert_id >= ? AND "
                                "alert_id < ? LIMIT 2", (p, p + "g")).fetchall()
        if len(rows) > 1:
            raise ValueError(f"alert id prefix {prefix} is ambiguous")
        return AlertRow(*rows[0]) if rows else None

    def alerts(self, *, state: str | None = None, limit: int = 1000) -> list[AlertRow]:
        q = f"SELECT {_ALERT_COLS} FROM alerts"
        args: list[Any] = []
        if state is not None:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY first_seen DESC, alert_id LIMIT ?"
        args.append(limit)
        return [AlertRow(*r) for r in self._db.execute(q, args)]

    def verdicts(self, limit: int) -> list[tuple[str, str, str]]:
        """(alert id, state, reason) of the ``limit`` alerts first seen last, newest first."""
        return [(str(a), str(s), str(r)) for a, s, r in self._db.execute(
            "SELECT alert_id, state, reason FROM alerts ORDER BY first_seen DESC LIMIT ?",
            (limit,))]

    def alert_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ALERT_STATES, 0)
        for state, n in self._db.execute("SELECT state, count(*) FROM alerts GROUP BY state"):
            counts[state] = n
        counts["detected"] = self._db.execute(
            "SELECT count(*) FROM alerts WHERE origin = 'detected'").fetchone()[0]
        counts["from_peers"] = self._db.execute(
            "SELECT count(*) FROM alerts WHERE origin != 'detected'").fetchone()[0]
        counts["verified_total"] = counts["verified"] + counts["forwarded"]
        counts["total"] = sum(counts[s] for s in ALERT_STATES)
        return counts

    def packets(self, alert_id: str) -> list[bytes]:
        return [r[0] for r in self._db.execute(
            "SELECT packet FROM packets WHERE alert_id = ? ORDER BY seq", (alert_id,))]

    # --- verifications --------------------------------------------------------------------

    def record_verification(self, alert_id: str, verified: bool, reason: str, detail: str,
                            elapsed_ms: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT INTO verifications (alert_id, verified, reason, detail,"
                       " elapsed_ms, at) VALUES (?, ?, ?, ?, ?, ?)",
                       (alert_id, int(verified), reason, detail[:1000], elapsed_ms, now))

    def verifications(self, alert_id: str) -> list[Verification]:
        return [Verification(r[0], bool(r[1]), r[2], r[3], r[4], r[5]) for r in
                self._db.execute("SELECT alert_id, verified, reason, detail, elapsed_ms, at"
                                 " FROM verifications WHERE alert_id = ? ORDER BY id",
                                 (alert_id,))]

    # --- filters --------------------------------------------------------------------------

    def filter_wanted(self, filter_id: str) -> bool:
        """False if an operator removed this filter: it must not come back unasked."""
        row = self._db.execute("SELECT state, removed_by FROM filters WHERE filter_id = ?",
                               (filter_id,)).fetchone()
        return not (row and row[0] == "removed" and row[1] == "operator")

    def record_filter(self, filter_json: dict[str, Any], *, alert_id: str | None,
                      expires: float | None = None, force: bool = False,
                      now: float | None = None) -> str:
        """Record a filter as installed. Returns ``"new"``, ``"reinstalled"`` (it was removed
        or expired), ``"unchanged"`` (already installed) or ``"skipped"``: a filter an
        operator removed stays removed unless ``force``."""
        now = time.time() if now is None else now
        fid = str(filter_json["id"])
        with self._tx() as db:
            row = db.execute("SELECT state, removed_by FROM filters WHERE filter_id = ?",
                             (fid,)).fetchone()
            if row and row[0] == "removed" and row[1] == "operator" and not force:
                return "skipped"
            if row and row[0] == "installed":
                return "unchanged"
            if row is None:
                db.execute(
                    "INSERT INTO filters (filter_id, alert_id, service_id, service, kind,"
                    " proto, port, json, state, created, updated, expires)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'installed', ?, ?, ?)",
                    (fid, alert_id, filter_json["service_id"], filter_json["service"],
                     filter_json["kind"], filter_json["proto"], filter_json["port"],
                     json.dumps(filter_json, sort_keys=True), now, now, expires))
                return "new"
            db.execute("UPDATE filters SET state = 'installed', removed_by = NULL,"
                       " updated = ?, expires = ?, alert_id = COALESCE(alert_id, ?)"
                       " WHERE filter_id = ?", (now, expires, alert_id, fid))
            return "reinstalled"

    def mark_filters(self, filter_ids: Sequence[str], state: str, by: str,
                     now: float | None = None) -> int:
        """Set removed/expired (``by``: "operator", "expiry", ...); returns rows changed."""
        if state not in FILTER_STATES:
            raise ValueError(f"bad filter state {state!r}")
        now = time.time() if now is None else now
        with self._tx() as db:
            n = 0
            for fid in filter_ids:
                n += db.execute("UPDATE filters SET state = ?, removed_by = ?, updated = ?"
                                " WHERE filter_id = ?", (state, by, now, fid)).rowcount
        return n

    def filters(self, *, state: str | None = None) -> list[FilterRow]:
        q = f"SELECT {_FILTER_COLS} FROM filters"
        args: list[Any] = []
        if state is not None:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY created, filter_id"
        return [FilterRow(*r) for r in self._db.execute(q, args)]

    def filter(self, filter_id: str) -> FilterRow | None:
        row = self._db.execute(f"SELECT {_FILTER_COLS} FROM filters WHERE filter_id = ?",
                               (filter_id,)).fetchone()
        return FilterRow(*row) if row else None

    def due_filters(self, now: float) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT filter_id FROM filters WHERE state = 'installed' AND expires IS NOT NULL"
            " AND expires <= ?", (now,))]

    # --- peers ----------------------------------------------------------------------------

    def record_peers(self, peers: Sequence[tuple[str, str, int]],
                     now: float | None = None) -> None:
        """Upsert (node id hex, host, port) peers as seen ``now``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            for node_id, host, port in peers:
                db.execute("INSERT INTO peers (node_id, host, port, first_seen, last_seen)"
                           " VALUES (?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                           " host = excluded.host, port = excluded.port,"
                           " last_seen = excluded.last_seen", (node_id, host, port, now, now))

    def peers(self) -> list[dict[str, Any]]:
        return [{"node_id": r[0], "host": r[1], "port": r[2], "first_seen": r[3],
                 "last_seen": r[4]} for r in self._db.execute(
                     "SELECT node_id, host, port, first_seen, last_seen FROM peers"
                     " ORDER BY last_seen DESC")]

    # --- events ---------------------------------------------------------------------------

    def record_events(self, events: Sequence[dict[str, Any]], keep: int) -> None:
        """Append events (dicts with ``timestamp_s`` and ``event_type``) and prune to the
        newest ``keep``."""
        if not events:
            return
        with self._tx() as db:
            db.executemany("INSERT INTO events (at, type, json) VALUES (?, ?, ?)",
                           [(e.get("timestamp_s", time.time()), e["event_type"],
                             json.dumps(e, sort_keys=True, default=str)) for e in events])
            db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?",
                       (keep,))

    def events(self, limit: int = 100, event_type: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT json FROM events", []
        if event_type is not None:
            q += " WHERE type = ?"
            args.append(event_type)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        out = []
        for (text,) in self._db.execute(q, args):
            with contextlib.suppress(ValueError):
                out.append(json.loads(text))
        return out[::-1]

    # --- throttle flags -------------------------------------------------------------------

    def flag_host(self, host: str, detail: str = "", now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as db:
            db.execute("INSERT INTO throttle_flags (host, state, flagged_at, detail)"
                       " VALUES (?, 'flagged', ?, ?) ON CONFLICT (host) DO UPDATE SET"
                       " state = 'flagged', flagged_at = excluded.flagged_at,"
                       " cleared_at = NULL, detail = excluded.detail", (host, now, detail))

    def clear_host(self, host: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute("UPDATE throttle_flags SET state = 'cleared', cleared_at = ?"
                              " WHERE host = ? AND state = 'flagged'", (now, host)).rowcount > 0

    def throttle_flags(self, *, flagged_only: bool = False) -> list[dict[str, Any]]:
        q = "SELECT host, state, flagged_at, cleared_at, detail FROM throttle_flags"
        if flagged_only:
            q += " WHERE state = 'flagged'"
        return [{"host": r[0], "state": r[1], "flagged_at": r[2], "cleared_at": r[3],
                 "detail": r[4]} for r in self._db.execute(q + " ORDER BY flagged_at")]


_ALERT_COLS = ("alert_id, service_id, service, type, alert, envelope, signer, signed_at, origin,"
               " from_peer, state, reason, first_seen, updated, seen_count")
_FILTER_COLS = ("filter_id, alert_id, service_id, service, kind, proto, port, json, state,"
                " removed_by, created, updated, expires")


class StoreRunner:
    """Runs store calls on one dedicated thread: the event loop never blocks on SQLite's
    fsync, and the connection is only ever used from that thread, one call at a time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue the call now (calls run in the order they were queued); await the result."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
