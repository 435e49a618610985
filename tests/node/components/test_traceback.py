"""The traceback router role in real daemons: router namespaces in a chain and in a tree, each
running ``herdwall node run`` with ``[traceback] router = true`` (overlay, NFQUEUE, the
component); attackers spoof their source; the victim's ``herdwall alert trace`` reads the
packets its store kept with the alert, asks the daemons over the overlay and prints the true
ingress and path."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.components.traceback import TracebackComponent, router_config, testbed_namespace
from node.daemon.config import ConfigError, parse_config
from node.daemon.control import ControlClient
from node.testbed.netns import Namespace
from node.traceback.netbed import CHAIN6, TREE9, TREE9_LEAVES, RouterNet
from sca.keys import NodeKey

VICTIM_KEY = NodeKey.from_private_bytes(b"\x66" * 32)
ALERT = "5a" * 32


def test_config_section_is_checked(tmp_path: Path) -> None:
    link = {"name": "to-r2", "kind": "router", "router_id": 102, "addr": "10.77.100.2:7400",
            "key": "ab" * 32}
    cfg = parse_config({"traceback": {"router": True, "router_id": 7, "links": [
        link, {"name": "h-lan", "kind": "edge", "prefix": "10.77.1.0/24"}],
        "queriers": ["CD" * 32]}}, base=tmp_path)
    rc = router_config(cfg.traceback)
    assert rc.router_id == 7 and [lk.name for lk in rc.links] == ["to-r2", "h-lan"]
    assert rc.links[0].peer is not None and rc.links[0].peer.addr == ("10.77.100.2", 7400)
    assert rc.queriers == frozenset([bytes.fromhex("cd" * 32)])
    assert router_config(parse_config({}, base=tmp_path).traceback).queriers is None
    for bad, key in [({"router_id": 1 << 14}, "router_id"),
                     ({"links": [{**link, "addr": "nowhere"}]}, "links"),
                     ({"links": [link] * 9}, "links"), ({"fp_rate": 0.9}, "fp_rate"),
                     ({"gateway_key": "xy"}, "gateway_key"), ({"colour": 1}, "colour")]:
        with pytest.raises(ConfigError, match=f"traceback.{key}"):
            parse_config({"traceback": bad}, base=tmp_path)


def _node(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    cfg = parse_config({"traceback": {"router": True, "router_id": 1}, **sections},
                       base=tmp_path, state_dir=tmp_path)
    return SimpleNamespace(config=cfg, key=NodeKey.generate())


def test_refused_outside_a_testbed_namespace(tmp_path: Path) -> None:
    """In the machine's own namespace (or without an overlay) the role does not start, and
    touches nothing on the way."""
    assert testbed_namespace() is None
    overlay = SimpleNamespace(overlay=object())
    comp = TracebackComponent(_node(tmp_path), overlay)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="testbed"):
        asyncio.run(comp.start())
    assert comp.service is None
    comp = TracebackComponent(_node(tmp_path), None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="overlay"):
        asyncio.run(comp.start())


@pytest.mark.netns
def test_namespace_is_recognised() -> None:
    with Namespace("tbns") as ns:
        assert ns.call(testbed_namespace) == ns.name


@pytest.mark.netns
def test_daemons_in_a_chain_answer_over_the_overlay(tmp_path: Path) -> None:
    hosts = {"atk": "r1", "by": "r3", "vic": "r6"}
    with RouterNet(CHAIN6, hosts, tag="tbd") as net:
        r1 = net.routers["r1"].ns
        with net.run_daemons(tmp_path / "nodes") as states:
            _trace_through_daemons(net, states, tmp_path)
            assert "NFQUEUE" in r1.run(["iptables", "-t", "mangle", "-S", "FORWARD"]).stdout
        # Stopped: the router role took its chain and its queue rule away (the node keeps
        # its own table for the next start).
        assert "NFQUEUE" not in r1.run(["iptables", "-t", "mangle", "-S", "FORWARD"]).stdout
        assert "chain traceback" not in r1.run(["nft", "list", "ruleset"]).stdout


def _trace_through_daemons(net: RouterNet, states: dict[str, Path], tmp_path: Path) -> None:
    """One spoofed packet, traced from the victim by the CLI; every daemon reports its role."""
    got, at = net.attack("atk", "vic", spoof=net.hosts["by"].addr)
    assert got[4:6] == b"\0\0"  # marked on the way, the last hop cleared it
    # The victim's node kept the packet with the alert it detected.
    argv = net.victim_node("vic", tmp_path / "vic", VICTIM_KEY, ALERT, [got], at + 0.3)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ingress: router 101 via h-atk (10.77.1.0/24)" in out.stdout
    rows = re.findall(r"router +(\d+) +10\.77\.\d+\.\d+:7400 +(logged|marked)", out.stdout)
    assert rows == [(str(101 + i), "logged" if i % 2 == 0 else "marked")
                    for i in range(6)]
    # Each daemon runs the role and says so; the routers on the path were asked.
    for name, state in states.items():
        with ControlClient(state / "control.sock") as c:
            comps = {x["name"]: x for x in c.request("status")["components"]}
        st = comps["traceback"]["status"]
        assert comps["traceback"]["state"] == "running" and st["running"]
        assert st["router_id"] == net.routers[name].router_id
        assert st["forwarded"] > 0 and st["queries"] >= 1


@pytest.mark.netns
@pytest.mark.slow
def test_daemons_in_a_tree_every_leaf_traced(tmp_path: Path) -> None:
    """Nine router daemons in a tree; an attacker behind every leaf sends one packet, all
    spoofing the same source; the victim's alert holds the four packets, and one ``herdwall
    alert trace --json`` names each packet's own leaf, link and path."""
    hosts = {f"a{i}": leaf for i, leaf in enumerate(TREE9_LEAVES)} | {"vic": "t0"}
    with RouterNet(TREE9, hosts, tag="tbe") as net, net.run_daemons(tmp_path / "nodes"):
        got = [net.attack(f"a{i}", "vic", spoof="10.77.99.99") for i in range(4)]
        argv = net.victim_node("vic", tmp_path / "vic", VICTIM_KEY, ALERT, [g for g, _ in got],
                               got[-1][1] + 0.3)
        out = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        doc = json.loads(out.stdout)
        assert len(doc["packets"]) == 4
        ids = {n: r.router_id for n, r in net.routers.items()}
        for i, (leaf, traced) in enumerate(zip(TREE9_LEAVES, doc["packets"], strict=True)):
            assert (ids[leaf], f"h-a{i}") in [(x["router_id"], x["link"])
                                              for x in traced["ingresses"]]
            assert [ids[r] for r in net.path(f"a{i}", "vic")] in [
                [h["router_id"] for h in p] for p in traced["paths"]]
