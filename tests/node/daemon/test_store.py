"""The store: WAL, transactions, nothing acknowledged lost to kill -9, hostile files refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.daemon.store import SCHEMA_VERSION, Store, StoreError

FILTER = {"id": "00112233aabbccdd", "kind": "specific", "service_id": "ab" * 32,
          "service": "resolver", "proto": "udp", "port": 1434,
          "condition": {"specific": {"offset": 1, "value": "41"}}, "words": ["byte 1 is 41"]}


def alert(store: Store, aid: str, state: str = "verified", **kw: object) -> bool:
    args: dict = {"alert_id": aid, "service_id": "ab" * 32, "service": "resolver",
                  "type": "execution-control", "alert": b"\xa6cbor", "origin": "overlay",
                  "state": state}
    args.update(kw)
    return store.record_alert(**args)


def test_new_store_is_wal_versioned_and_private(tmp_path: Path) -> None:
    path = tmp_path / "st" / "herdwall.db"
    with Store(path) as s:
        assert s.journal_mode == "wal"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA application_id").fetchone()[0] == 0x68657264
    db.close()
    with Store(path, create=False) as s:  # reopens
        assert s.alerts() == []


def test_missing_store_not_created_for_readers(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_alerts_round_trip_and_updates(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        assert alert(s, "aa" * 32, "refuted", reason="bad-signature", envelope=b"forged",
                     signer="11" * 20, packets=[b"p1", b"p2"],
                     verification=(False, "trap-not-reached", "no", 0.5))
        assert not alert(s, "aa" * 32, "verified", reason="verified", envelope=b"good",
                         signer="22" * 20)
        row = s.alert("aa" * 32)
        assert row is not None
        # A badly signed copy gives way to a good one.
        assert (row.state, row.envelope, row.signer, row.seen_count) == (
            "verified", b"good", "22" * 20, 2)
        assert s.packets("aa" * 32) == [b"p1", b"p2"]
        assert [v.reason for v in s.verifications("aa" * 32)] == ["trap-not-reached"]
        alert(s, "ab" * 32, "received", origin="detected")
        assert s.find_alert("aaaa").alert_id == "aa" * 32  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="at least 4"):
            s.find_alert("a")
    with Store(tmp_path / "s.db") as s:
        with pytest.raises(ValueError):
            s.find_alert("zz")
        counts = s.alert_counts()
        assert counts["verified"] == 1 and counts["received"] == 1
        assert counts["detected"] == 1 and counts["from_peers"] == 1 and counts["total"] == 2


def test_ambiguous_prefix(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        alert(s, "abcd" + "0" * 60)
        alert(s, "abcd" + "1" * 60)
        with pytest.raises(ValueError, match="ambiguous"):
            s.find_alert("abcd")
        assert s.find_alert("abcd1") is not None
        assert s.find_alert("ffff") is None


def test_operator_removal_is_remembered(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        assert s.record_filter(FILTER, alert_id="aa" * 32) == "new"
        assert s.record_filter(FILTER, alert_id="aa" * 32) == "unchanged"
        assert s.mark_filters([FILTER["id"]], "removed", "operator") == 1
        assert not s.filter_wanted(FILTER["id"])
        assert s.record_filter(FILTER, alert_id="bb" * 32) == "skipped"
        assert s.filter(FILTER["id"]).state == "removed"  # type: ignore[union-attr]
        assert s.record_filter(FILTER, alert_id=None, force=True) == "reinstalled"
        s.mark_filters([FILTER["id"]], "expired", "expiry")
        assert s.record_filter(FILTER, alert_id=None) == "reinstalled"  # expiry is no veto


def test_expiry_due(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        s.record_filter(FILTER, alert_id=None, expires=100.0)
        assert s.due_filters(99.0) == []
        assert s.due_filters(100.0) == [FILTER["id"]]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        with pytest.raises(ValueError):
            alert(s, "aa" * 32, "no-such-state")
        # An error half way through a write (the second packet is not bytes) rolls it all back.
        with pytest.raises(TypeError):
            alert(s, "cc" * 32, packets=[b"ok", object()])  # type: ignore[list-item]
        assert s.alert("cc" * 32) is None and s.packets("cc" * 32) == []


def test_events_are_pruned_to_the_newest(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        for i in range(5):
            s.record_events([{"timestamp_s": float(i), "event_type": "t", "n": i}], keep=3)
        assert [e["n"] for e in s.events()] == [2, 3, 4]
        assert s.events(event_type="none") == []


def test_peers_and_throttle_flags(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        s.record_peers([("11" * 20, "10.77.0.1", 7400)], now=1.0)
        s.record_peers([("11" * 20, "10.77.0.2", 7400)], now=2.0)
        assert s.peers() == [{"node_id": "11" * 20, "host": "10.77.0.2", "port": 7400,
                              "first_seen": 1.0, "last_seen": 2.0}]
        s.flag_host("10.77.0.9", "queue 101")
        assert [f["host"] for f in s.throttle_flags(flagged_only=True)] == ["10.77.0.9"]
        assert s.clear_host("10.77.0.9") and not s.clear_host("10.77.0.9")
        assert s.throttle_flags(flagged_only=True) == []


# --- hostile and corrupt files -------------------------------------------------------------


def test_random_bytes_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="not an SQLite database"):
        Store(path)


def test_foreign_sqlite_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE x (y)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a herdwall store"):
        Store(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than"):
        Store(path)


def test_damaged_pages_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        for i in range(200):
            alert(s, f"{i:064x}", packets=[os.urandom(1000)])
    # Checkpointed into the main file, then pages after the header scribbled over.
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = bytearray(path.read_bytes())
    for off in range(4096, len(data), 4096):
        data[off:off + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"corrupt|integrity|not a herdwall"):
        Store(path)


def test_truncated_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        alert(s, "aa" * 32)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(StoreError):
        Store(path)


def test_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "s.db").mkdir()
    with pytest.raises(StoreError, match="not a regular file"):
        Store(tmp_path / "s.db")


def test_cli_reports_a_corrupt_store_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "st"
    state.mkdir()
    (state / "herdwall.db").write_bytes(b"garbage" * 100)
    herdwall = str(Path(sys.executable).parent / "herdwall")
    r = subprocess.run([herdwall, "alert", "list", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error: store ") and "not an SQLite database" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_names_an_ambiguous_prefix_and_writes_exports_whole(tmp_path: Path) -> None:
    state = tmp_path / "st"
    with Store(state / "herdwall.db") as s:
        alert(s, "abcd" + "0" * 60)
        alert(s, "abcd" + "1" * 60)
    herdwall = str(Path(sys.executable).parent / "herdwall")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([herdwall, "alert", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60)

    r = run("show", "abcd")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: alert id prefix abcd is ambiguous"
    missing = tmp_path / "no-such-folder" / "a.cbor"
    r = run("export", "abcd0", "--alert", "-o", str(missing))
    assert r.returncode == 1 and r.stderr.startswith(f"error: cannot write {missing}: ")
    out = tmp_path / "a.cbor"
    out.write_bytes(b"older")
    assert run("export", "abcd0", "--alert", "-o", str(out)).returncode == 0
    assert out.read_bytes() == b"\xa6cbor"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["a.cbor"]


def test_an_io_error_is_not_called_corruption(tmp_path: Path) -> None:
    """A store that cannot be written (here: files limited to 200 bytes, as on a full disk)
    is reported as such, without the advice to discard it that a corrupt one gets."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    code = ("import sys\nfrom node.daemon.store import Store, StoreError\n"
            "try:\n    Store(sys.argv[1])\nexcept StoreError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.db")], text=True,
                       capture_output=True, timeout=60, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cannot use store ") and "corrupt" not in r.stdout, r.stdout


# --- kill -9 -------------------------------------------------------------------------------

WRITER = """
import sys
from node.daemon.store import Store
s = Store(sys.argv[1])
i = 0
while True:
    aid = f"{i:064x}"
    s.record_alert(alert_id=aid, service_id="ab" * 32, service="resolver",
                   type="execution-control", alert=b"x" * 500, origin="overlay",
                   state="verified", packets=[b"p" * 200])
    s.record_filter({"id": f"{i:016x}", "kind": "specific", "service_id": "ab" * 32,
                     "service": "resolver", "proto": "udp", "port": 1434,
                     "condition": {}}, alert_id=aid)
    print(aid, flush=True)  # acknowledged: both transactions committed
    i += 1
"""


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    acked: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    os.kill(proc.pid, signal.SIGKILL)  # mid-write, most likely
    proc.wait(10)
    acked += [line.strip() for line in proc.stdout.read().splitlines() if len(line) == 65]
    assert len(acked) >= 150
    with Store(path) as s:
        have = {r.alert_id for r in s.alerts(limit=100_000)}
        assert set(acked) <= have
        filters = {r.filter_id for r in s.filters()}
        assert {a[-16:] for a in acked} <= filters
