"""Node daemons in testbed hosts (``node.testbed.daemons``) and the worm demo engine
(``node.demo_worm``) in its run without herdwall, with plain progress lines."""

from __future__ import annotations

import io
import os
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from node.demo_worm import WormDemoConfig, run_worm_demo
from node.testbed import leftovers
from node.testbed.daemons import Fleet, NodeSpec, config_toml
from node.testbed.hosts import WormBed

pytestmark = pytest.mark.netns


def test_config_file_is_valid_toml_the_daemon_accepts(tmp_path: Path) -> None:
    from node.daemon.config import load_config

    spec = NodeSpec("hw-x", "10.77.0.5", detector=True, bootstrap=["10.77.0.3:7400"],
                    settings={"throttle": {"quarantine_infected": True, "threshold": 50}})
    text = config_toml(spec, tmp_path / "state")
    data = tomllib.loads(text)
    assert data["detector"]["enabled"] is True
    assert data["overlay"] == {"bind": "10.77.0.5:7400", "bootstrap": ["10.77.0.3:7400"]}
    assert data["services"]["manifests"][0].endswith("resolver/service.toml")
    (tmp_path / "node.toml").write_text(text)
    cfg = load_config(tmp_path / "node.toml")
    assert cfg.detector.enabled and cfg.throttle.quarantine_infected
    assert cfg.throttle.threshold == 50 and cfg.state_dir == tmp_path / "state"


def test_fleet_runs_nodes_inside_the_hosts_only(tmp_path: Path) -> None:
    own_tables = os.popen("nft list tables 2>/dev/null").read()
    with WormBed(vulnerable=2, detectors=1, dark=False, client=False, tag="fl") as bed:
        specs = bed.node_specs()
        with Fleet(specs, root=tmp_path / "nodes") as fleet:
            fleet.start()
            for n in fleet:
                st = n.request("status")
                assert st["node"]["state"] == "running" and st["kernel"]["ok"]
                assert [s["name"] for s in st["services"]] == ["resolver"]
                tables = bed.testbed.hosts[0].ns.run(["nft", "list", "tables"]).stdout \
                    if bed.testbed else ""
                assert "herdwall" not in tables  # the attacker runs no node
                inside = _ns_tables(n.spec.ns)
                assert "inet herdwall" in inside
            det = fleet.nodes[0]
            assert det.spec.detector and det.first("node.started") is not None
        assert all(not n.alive() for n in fleet)
        names = bed.namespaces()
    # Nothing of herdwall in the machine's own namespace, and no namespace left.
    assert os.popen("nft list tables 2>/dev/null").read() == own_tables
    assert names and not set(names) & set(leftovers())


def _ns_tables(ns: str) -> str:
    from node.testbed import Namespace

    return Namespace.attach(ns).run(["nft", "list", "tables"]).stdout


@pytest.mark.slow
def test_worm_demo_without_herdwall_plain_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120)  # not a terminal: plain progress lines
    mine = f"hw-{os.getpid()}-demo"
    rc = run_worm_demo(console, WormDemoConfig(vulnerable=4, detectors=1, rate=100,
                                               with_herdwall=False, without_s=30))
    text = out.getvalue()
    assert rc == 0, text
    assert "worm released at 10.77.0.1" in text and "infected by" in text
    assert "(4/4)" in text and "never: all infected" in text
    assert "testbed removed" in text
    assert "\x1b[" not in text.split("Slammer-class worm")[0]  # no live view when piped
    assert not [n for n in leftovers() if n.startswith(mine)]
