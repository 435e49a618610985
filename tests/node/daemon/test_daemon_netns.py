"""Real ``herdwall node run`` processes inside network namespaces: status over the socket, the
detect and receive paths into a real ``inet herdwall`` table, the everyday CLI through the
console script, SIGTERM, kill -9 and restarts that reconcile the kernel with the store."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from node.kernel.queue_rules import QueueRules
from sca.codec import alert_id_hex
from sca.envelope import decode_envelope
from sca.services import traffic

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent


def manifest(name: str) -> str:
    return str(HERE.parents[2] / "sca" / "services" / name / "service.toml")


def submit(daemon: Any, service: str, seed: int = 5) -> str:
    messages = traffic(service).exploit(random.Random(seed))
    return daemon.request(
        "detector.submit", service=service,
        messages=[[m.connection, m.data.hex()] for m in messages],
        packets=[[(b"\x45\x00" + m.data[:20]).hex()] for m in messages])


def kernel_filters(daemon: Any) -> set[str]:
    out = json.loads(daemon.nft("-j", "list", "table", "inet", "herdwall") or "{}")
    ids: set[str] = set()
    for item in out.get("nftables", []):
        for e in (item.get("set") or {}).get("elem", []) or []:
            c = str((e.get("elem") or {}).get("comment", ""))
            if c.startswith("hw:"):
                ids.add(c[3:])
        c = str((item.get("rule") or {}).get("comment", ""))
        if c.startswith("hw:"):
            ids.add(c[3:])
    return ids


def ok(r: subprocess.CompletedProcess[bytes], code: int = 0) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    return r.stdout.decode()


@pytest.mark.slow
def test_detector_daemon_end_to_end(netns: Any, daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(netns.name, {"services": {"manifests": [manifest("resolver")]},
                                     "detector": {"enabled": True},
                                     "throttle": {"enabled": False}})
    d.start()
    st = d.request("status")
    key_id = st["node"]["id"]
    assert st["node"]["state"] == "running" and st["kernel"]["ok"] is True
    assert [s["name"] for s in st["services"]] == ["resolver"]
    assert oct((d.state / "node.key").stat().st_mode & 0o777) == "0o600"
    assert oct(d.state.stat().st_mode & 0o777) == "0o700"

    assert submit(d, "resolver") == "queued"
    alerts = d.wait_for(lambda: d.request("alerts"), what="an alert")
    aid = alerts[0]["alert_id"]
    assert (alerts[0]["origin"], alerts[0]["signer"]) == ("detected", key_id)
    rows = d.wait_for(lambda: [r for r in d.request("filters") if r["kind"] == "general"]
                      and d.request("filters"), what="both filters")
    ids = {r["filter_id"] for r in rows}
    assert kernel_filters(d) == ids and all(r["in_kernel"] for r in rows)

    # The everyday CLI, through the console script, against the running node.
    listed = json.loads(ok(d.cli("alert", "list", "--json")))
    assert [a["alert_id"] for a in listed] == [aid]
    shown = ok(d.cli("alert", "show", aid[:10]))
    assert aid in shown and "our sandbox: verified" in shown and "signature" in shown
    env_file = tmp_path / "a.env"
    ok(d.cli("alert", "export", aid[:8], "-o", str(env_file)))
    env = decode_envelope(env_file.read_bytes())
    env.check()
    assert alert_id_hex(env.alert_bytes) == aid
    pcap = tmp_path / "a.pcap"
    ok(d.cli("alert", "export", aid[:8], "--pcap", "-o", str(pcap)))
    assert pcap.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"
    table = ok(d.cli("filter", "list"))
    assert all(i in table for i in ids)
    assert json.loads(ok(d.cli("peer", "list", "--json"))) == []
    r = d.cli("throttle", "status")
    assert r.returncode == 1 and b"throttle is off" in r.stderr
    r = d.cli("throttle", "clear", "10.77.0.9")
    assert r.returncode == 1 and b"throttle is off" in r.stderr
    status = json.loads(ok(d.cli("node", "status", "--json")))
    assert status["running"] and status["alerts"]["detected"] == 1
    ok(d.cli("node", "status"))

    # An operator removes the general filter: gone from the kernel, remembered.
    general = next(r["filter_id"] for r in rows if r["kind"] == "general")
    ok(d.cli("filter", "remove", general))
    assert general not in kernel_filters(d)
    r = d.cli("filter", "remove", "0123456789abcdef")
    assert r.returncode == 1 and b"no installed filter" in r.stderr

    r = d.cli("node", "teardown")  # refused while the node runs
    assert r.returncode == 1 and b"a node is running" in r.stderr
    assert kernel_filters(d) == ids - {general}

    # SIGTERM: clean exit, filters stay in the kernel, socket gone.
    assert d.stop(signal.SIGTERM) == 0
    assert "stopped; filters left in place" in d.stdout()
    assert kernel_filters(d) == ids - {general}
    assert not d.socket.exists()
    events = [json.loads(line) for line in (d.state / "events.jsonl").read_text().splitlines()]
    types = [e["event_type"] for e in events]
    assert types[0] == "node.started" and types[-1] == "node.stopped"
    assert "alert.detected" in types and "filter.removed" in types

    # With no node: the CLI reads the store (and the kernel, in this namespace).
    listed = json.loads(ok(d.cli("alert", "list", "--json")))
    assert listed[0]["alert_id"] == aid
    r = d.cli("node", "status")
    assert r.returncode == 3 and b"not running" in r.stdout
    rows = json.loads(ok(d.cli("filter", "list", "--json", "--all")))
    assert {r["filter_id"]: r["state"] for r in rows}[general] == "removed"

    # Someone deletes the whole table; the restart puts back what the store says, and the
    # operator's removal stays.
    netns.run("nft", "delete", "table", "inet", "herdwall")
    d.start()
    assert kernel_filters(d) == ids - {general}
    assert d.request("status")["node"]["id"] == key_id  # same key

    # kill -9: nothing acknowledged is lost, the stale socket does not stop the restart.
    d.stop(signal.SIGKILL)
    netns.run("nft", "flush", "table", "inet", "herdwall")
    d.start()
    assert kernel_filters(d) == ids - {general}
    assert [a["alert_id"] for a in d.request("alerts")] == [aid]
    d.stop()

    # Teardown removes everything herdwall put in the kernel, the queue rules that the
    # takeover and traceback components add included.
    from node.kernel.marks import Q_TAKEOVER, Q_TRACE, QUEUE_TAKEOVER, QUEUE_TRACE
    QueueRules(netns=netns.name, queues={QUEUE_TAKEOVER: Q_TAKEOVER}).install()
    QueueRules(netns=netns.name, queues={QUEUE_TRACE: Q_TRACE}, chains=("FORWARD",),
               tools=("iptables",)).install()
    out = ok(d.cli("node", "teardown"))
    assert QueueRules(netns=netns.name).present() == []
    assert "removed table inet herdwall" in out
    assert kernel_filters(d) == set()
    assert "herdwall" not in netns.run("nft", "list", "tables").stdout


@pytest.mark.slow
def test_receiving_daemon_verifies_imports_and_refuses_forgeries(
        netns_factory: Any, daemon_factory: Any, tmp_path: Path) -> None:
    sections = {"services": {"manifests": [manifest("mgmtd")]}, "filters": {"general": False}}
    detector = daemon_factory(netns_factory().name, {**sections, "detector": {"enabled": True}})
    receiver = daemon_factory(netns_factory().name, sections)
    detector.start()
    receiver.start()
    submit(detector, "mgmtd")
    aid = detector.wait_for(lambda: detector.request("alerts"), what="alert")[0]["alert_id"]
    env_file = tmp_path / "a.env"
    ok(detector.cli("alert", "export", aid, "-o", str(env_file)))

    out = ok(receiver.cli("alert", "import", str(env_file)))
    assert f"alert {aid}: verified" in out
    again = ok(receiver.cli("alert", "import", str(env_file)))
    assert "already known" in again
    row = receiver.request("alert", id=aid)
    assert row["origin"] == "import" and row["verifications"][0]["verified"]
    assert row["signer"] == detector.request("status")["node"]["id"]
    wanted = {f["filter_id"] for f in row["filters"]}
    receiver.wait_for(lambda: kernel_filters(receiver) == wanted, what="filter in kernel")

    forged = bytearray(env_file.read_bytes())
    forged[forged.index(decode_envelope(bytes(forged)).signature) + 3] ^= 1
    bad = tmp_path / "forged.env"
    bad.write_bytes(bytes(forged))
    r = receiver.cli("alert", "import", str(bad))
    assert r.returncode == 1 and b"refuted (bad-signature)" in r.stdout
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(300))
    r = receiver.cli("alert", "import", str(junk))
    assert r.returncode == 1 and b"malformed" in r.stdout
    assert receiver.request("status")["node"]["state"] == "running"


def test_hostile_control_input_never_crashes_the_daemon(netns: Any,
                                                        daemon_factory: Any) -> None:
    d = daemon_factory(netns.name)
    d.start()
    for blob in (b"\x00" * 100 + b"\n", b"{" * 70000 + b"\n", b'{"cmd":"alert","args":{"id":5}}\n',
                 b'{"cmd":"alerts","args":{"limit":-1}}\n', b'{"cmd":"filter.remove"}\n',
                 b'{"cmd":"detector.submit","args":{"service":"x","messages":[[1]]}}\n',
                 b'{"cmd":"throttle.clear","args":{"host":"not-an-ip"}}\n',
                 b'{"cmd":"alert.import","args":{"envelope":"zz"}}\n', os.urandom(4096)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(d.socket))
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(65536)
        s.close()
        assert reply == b"" or b'"ok":false' in reply, reply
    st = d.request("status")
    assert st["node"]["state"] == "running" and st["control"]["requests"] >= 5
    # A second node on the same state directory is refused; the first one is unharmed.
    from daemon_proc import HERDWALL

    r = subprocess.run(["ip", "netns", "exec", netns.name, HERDWALL, "node", "run",
                        "--config", str(d.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already running" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert d.request("ping") == "pong" and d.socket.exists()
    log = (d.state / "events.jsonl").read_text()
    assert "node.stopped" not in log and log.count("node.started") == 1


def test_no_config_at_all(netns: Any, tmp_path: Path) -> None:
    """`herdwall node run` with no file: state made on first run, the samples not protected."""
    from daemon_proc import HERDWALL

    from node.daemon.control import ControlClient, NoNode

    state = tmp_path / "st"
    env = {**os.environ, "HERDWALL_STATE_DIR": str(state)}
    env.pop("HERDWALL_CONFIG", None)
    proc = subprocess.Popen(["ip", "netns", "exec", netns.name, HERDWALL, "node", "run"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        st = None
        while time.monotonic() < deadline and st is None and proc.poll() is None:
            try:
                with ControlClient(state / "control.sock") as c:
                    st = c.request("status")
                    if st["node"]["state"] != "running":
                        st = None
            except (NoNode, OSError):
                time.sleep(0.1)
        assert st is not None, proc.poll()
        assert st["services"] == [] and st["detector"]["enabled"] is False
        assert (state / "node.key").exists() and (state / "herdwall.db").exists()
        assert st["node"]["config"] is None and st["kernel"]["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_corrupt_store_stops_the_start_with_one_line(daemon_factory: Any) -> None:
    d = daemon_factory(None)  # kernel off: nothing would be touched anyway
    d.state.mkdir(mode=0o700)
    (d.state / "herdwall.db").write_bytes(b"not a database" * 10)
    with pytest.raises(RuntimeError, match="node exited 1"):
        d.start()
    err = d.stderr().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: store ")
    assert "not an SQLite database" in err[0]
