"""``herdwall alert trace`` input handling: stored packets, files, gateways from the options or
the config, bad input (the traced path itself is tested end to end in the namespaces,
``test_traceback_netns.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from node.cli import main
from node.daemon.store import Store
from node.stack.packet import ip_bytes, udp_packet
from node.testbed.netns import Namespace
from sca.keys import NodeKey

ALERT = "ab" * 32
BARE = "cd" * 32  # an alert with no packets kept
GW = ["--gateway", "10.77.104.2:7400", "--gateway-key", "11" * 32]
PKT = udp_packet(ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2"), 1, 2, b"x")


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory with a node key and a store holding two alerts, one with the raw
    packet that carried it."""
    d = tmp_path / "state"
    NodeKey.generate().save(d)
    with Store(d / "herdwall.db") as store:
        for aid, packets in ((ALERT, [PKT]), (BARE, [])):
            store.record_alert(alert_id=aid, service_id="00" * 32, service="svc", type="t",
                               alert=b"x", origin="detected", state="verified",
                               packets=packets, now=1_700_000_000.0)
    return d


def test_listed_under_alert() -> None:
    code, out, _ = run("alert", "--help")
    assert code == 0 and "trace" in out
    code, out, _ = run("alert", "trace", "--help")
    assert code == 0 and "--packet" in out and "--gateway-key" in out


def test_stored_alerts_without_packets_or_unknown(state: Path) -> None:
    code, _, err = run("alert", "trace", BARE, *GW, "--state-dir", str(state))
    assert code == 1 and "no raw packets kept" in err and "--packet FILE" in err
    code, _, err = run("alert", "trace", "ef" * 32, *GW, "--state-dir", str(state))
    assert code == 1 and "no alert" in err


def test_bad_inputs(tmp_path: Path, state: Path) -> None:
    pkt = tmp_path / "p.ip"
    pkt.write_bytes(PKT)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x60" + b"\0" * 50)
    sd = ["--state-dir", str(state)]
    assert run("alert", "trace", "not-hex", "--packet", str(pkt), *GW, *sd)[0] == 2
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), *sd)
    assert code == 2 and "--gateway" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), "--gateway", "nowhere",
                       "--gateway-key", "11" * 32, *sd)
    assert code == 2
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), "--gateway",
                       "10.77.1.1:7400", "--gateway-key", "zz", *sd)
    assert code == 2 and "64 hex" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), *GW, "--bind", "x", *sd)
    assert code == 2 and "--bind" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(junk), *GW, *sd)
    assert code == 1 and "not an IPv4 packet" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(tmp_path / "missing"), *GW, *sd)
    assert code == 1
    # No node key yet: one line telling what to do.
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), *GW, "--state-dir",
                       str(tmp_path / "empty"))
    assert code == 1 and err.startswith("error:")
    # A bad [traceback] section in the config is named.
    conf = tmp_path / "bad.toml"
    conf.write_text('[traceback]\ngateway_key = "zz"\n')
    code, _, err = run("alert", "trace", ALERT, "--config", str(conf), *sd)
    assert code == 1 and "traceback.gateway_key" in err


@pytest.mark.netns
def test_unreachable_gateway_is_reported_not_crashed(tmp_path: Path, state: Path) -> None:
    """The alert's stored packet, the gateway from the config, and a gateway that never
    answers (a closed port on the loopback of a namespace made for this test, so not even a
    datagram touches the machine's own): the trace ends with no ingress, exit status 3, after
    the retries."""
    conf = tmp_path / "node.toml"
    conf.write_text(f'[traceback]\ngateway = "127.0.0.1:9"\ngateway_key = "{"11" * 32}"\n')
    with Namespace("cli") as ns:
        code, out, _ = ns.call(run, "alert", "trace", ALERT[:8], "--config", str(conf),
                               "--state-dir", str(state), "--timeout", "0.02", "--tries", "2")
    assert code == 3 and "no ingress found" in out
    assert "udp 10.77.1.2 -> 10.77.2.2" in out  # the stored packet
    assert "did not answer: trail ends here" in out
