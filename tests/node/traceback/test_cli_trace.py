"""``herdwall alert trace`` input handling (the traced path itself is tested end to end in the
namespaces, ``test_traceback_netns.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from node.cli import main
from node.stack.packet import ip_bytes, udp_packet
from node.testbed.netns import Namespace
from sca.keys import NodeKey

ALERT = "ab" * 32
GW = ["--gateway", "10.77.104.2:7450", "--gateway-key", "11" * 32]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_listed_under_alert() -> None:
    code, out, _ = run("alert", "--help")
    assert code == 0 and "trace" in out
    code, out, _ = run("alert", "trace", "--help")
    assert code == 0 and "--packet" in out and "--gateway-key" in out


def test_needs_packets_until_the_store_keeps_them() -> None:
    code, _, err = run("alert", "trace", ALERT, *GW)
    assert code == 1 and "give them with --packet FILE" in err


def test_bad_inputs(tmp_path: Path) -> None:
    pkt = tmp_path / "p.ip"
    pkt.write_bytes(udp_packet(ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2"), 1, 2, b"x"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x60" + b"\0" * 50)
    assert run("alert", "trace", "not-hex", "--packet", str(pkt), *GW)[0] == 2
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt))
    assert code == 2 and "--gateway" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), "--gateway", "nowhere",
                       "--gateway-key", "11" * 32)
    assert code == 2
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), "--gateway",
                       "10.77.1.1:7450", "--gateway-key", "zz")
    assert code == 2 and "64 hex" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(junk), *GW)
    assert code == 1 and "not an IPv4 packet" in err
    code, _, err = run("alert", "trace", ALERT, "--packet", str(tmp_path / "missing"), *GW)
    assert code == 1
    # No node key yet: one line telling what to do.
    code, _, err = run("alert", "trace", ALERT, "--packet", str(pkt), *GW, "--state-dir",
                       str(tmp_path / "empty"))
    assert code == 1 and err.startswith("error:")


@pytest.mark.netns
def test_unreachable_gateway_is_reported_not_crashed(tmp_path: Path) -> None:
    """A gateway that never answers (a closed port on the loopback of a namespace made for
    this test, so not even a datagram touches the machine's own): the trace ends with no
    ingress, exit status 3, after the retries."""
    pkt = tmp_path / "p.ip"
    pkt.write_bytes(udp_packet(ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2"), 1, 2, b"x"))
    state = tmp_path / "state"
    NodeKey.generate().save(state)
    with Namespace("cli") as ns:
        code, out, _ = ns.call(run, "alert", "trace", ALERT, "--packet", str(pkt),
                               "--gateway", "127.0.0.1:9", "--gateway-key", "11" * 32,
                               "--state-dir", str(state), "--timeout", "0.02", "--tries", "2")
    assert code == 3 and "no ingress found" in out
    assert "did not answer: trail ends here" in out
