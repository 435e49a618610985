"""``herdwall testbed up|down|status``: a testbed outlives the command that made it, down
removes it (processes and namespaces), orphaned hw- leftovers go, and namespaces whose maker
still runs are left alone."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from node.cli import main
from node.testbed import Namespace, leftovers
from node.testbed.registry import ns_pids

pytestmark = pytest.mark.netns


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "registry"
    monkeypatch.setenv("HERDWALL_TESTBED_DIR", str(d))
    return d


def _cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_up_status_down_with_the_vulnerable_services(registry: Path) -> None:
    try:
        rec = json.loads(_cli("testbed", "up", "--name", "tr1", "--vulnerable", "2",
                              "--detectors", "1", "--services", "--json"))
        assert len(rec["namespaces"]) == 6 and (registry / "tr1.json").exists()
        present = set(leftovers())
        assert set(rec["namespaces"]) <= present
        st = json.loads(_cli("testbed", "status", "--json"))
        (bed,) = st["testbeds"]
        assert bed["name"] == "tr1" and bed["namespaces_present"] == 6
        (services,) = bed["processes"]
        assert services["kind"] == "services" and services["alive"]
        # The services answer: a lookup from the client host gets the resolver's reply.
        client = next(h for h in rec["hosts"] if h["role"] == "client")
        vul = next(h for h in rec["hosts"] if h["role"] == "vulnerable")

        def ask() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(b"\x04REPORTING\x00", (vul["addr"], 1434))
                return s.recv(2048)

        assert b"InstanceName;REPORTING;" in Namespace.attach(client["ns"]).call(ask)
        with pytest.raises(ValueError, match="up already"):
            from node.testbed.registry import up

            up("tr1")
        out = _cli("testbed", "down", "tr1")
        assert "testbed tr1: 1 process(es) stopped, 6 namespace(s) deleted" in out
        assert not set(rec["namespaces"]) & set(leftovers())
        assert not Path(rec["root"]).exists() and not (registry / "tr1.json").exists()
        assert "no testbed is up" in _cli("testbed", "status")
    finally:
        CliRunner().invoke(main, ["testbed", "down", "tr1"])


def test_down_removes_orphans_only(registry: Path) -> None:
    # An orphan: a hw-<pid>- name whose pid cannot be running (beyond pid_max), nothing inside.
    orphan = "hw-4999999-orph-000001"
    import subprocess

    subprocess.run(["ip", "netns", "add", orphan], check=True)
    mine = Namespace("keep")  # made by this (running) process: never touched
    try:
        assert ns_pids(orphan) == []
        out = json.loads(_cli("testbed", "down", "--json"))
        assert orphan in out["leftovers_deleted"]
        assert mine.name not in out["leftovers_deleted"]
        assert any(k["name"] == mine.name and k["maker_alive"] for k in out["leftovers_kept"])
        assert orphan not in leftovers() and mine.name in leftovers()
    finally:
        subprocess.run(["ip", "netns", "delete", orphan], capture_output=True)
        mine.close()


def test_chain_layout_up_and_down(registry: Path) -> None:
    rec = json.loads(_cli("testbed", "up", "--name", "tr2", "--layout", "chain", "--json"))
    try:
        assert [h["role"] for h in rec["hosts"]] == ["atk", "det", "r1", "r2", "r3", "vul",
                                                     "cli"]
        assert "chain" in _cli("testbed", "status")
    finally:
        _cli("testbed", "down", "tr2")
    assert not set(rec["namespaces"]) & set(leftovers())
