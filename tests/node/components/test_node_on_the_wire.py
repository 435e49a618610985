"""A real node daemon with its stack, throttle and overlay components, in a namespace, fed by
real packets from another namespace: the exploit is caught from the wire by taint replay,
the node installs its own filters, and the next exploit datagrams never arrive while benign
ones do. The vulnerable service itself runs only in the emulator: on the wire there is just a
plain UDP sink (no service code) so we can see what the kernel lets through."""

from __future__ import annotations

import importlib.util
import random
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from node.testbed import Testbed
from sca.services import manifest_path, traffic

pytestmark = [pytest.mark.netns, pytest.mark.slow]
SERVER = "10.77.0.1"


def _daemon_proc() -> Any:
    path = Path(__file__).resolve().parents[1] / "daemon" / "daemon_proc.py"
    spec = importlib.util.spec_from_file_location("daemon_proc", path)
    assert spec is not None and spec.loader is not None
    mod = sys.modules.get("daemon_proc") or importlib.util.module_from_spec(spec)
    if "daemon_proc" not in sys.modules:
        sys.modules["daemon_proc"] = mod
        spec.loader.exec_module(mod)
    return mod


def test_exploit_from_the_wire_is_caught_and_then_filtered(testbed: Testbed,
                                                           tmp_path: Path) -> None:
    dp = _daemon_proc()
    d = dp.Daemon(tmp_path, netns=testbed[0].name, sections={
        "services": {"manifests": [str(manifest_path("resolver"))]},
        "detector": {"enabled": True},
        "overlay": {"enabled": True, "bind": f"{SERVER}:7400"},
    })
    sink = testbed[0].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    cli = testbed[1].ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        d.start()
        st = d.request("status")
        names = {c["name"]: c["state"] for c in st["components"]}
        assert names == {"overlay": "running", "throttle": "running", "stack": "running"}, st
        sink.bind((SERVER, 1434))
        sink.settimeout(0.5)
        t = traffic("resolver")
        exploit = t.exploit(random.Random(1))[-1].data
        cli.sendto(exploit, (SERVER, 1434))
        alerts = d.wait_for(lambda: d.request("alerts"), timeout=60, what="an alert")
        assert alerts[0]["origin"] == "detected" and alerts[0]["type"] == "execution-control"
        d.wait_for(lambda: sum(1 for r in d.request("filters") if r.get("in_kernel")) >= 2,
                   timeout=60, what="both filters in the kernel")
        while True:  # drain what arrived before the filters
            try:
                sink.recv(65536)
            except TimeoutError:
                break
        variants = [m.data for i in range(10) for m in t.exploit(random.Random(100 + i))
                    if m.data[:1] == b"\x04" and len(m.data) > 70]
        rng = random.Random(7)
        benign = [m.data for _ in range(10) for m in t.benign(rng)]
        got = []
        for data in variants + benign:
            cli.sendto(data, (SERVER, 1434))
            try:
                got.append(sink.recv(65536))
            except TimeoutError:
                got.append(None)
        assert got[:len(variants)] == [None] * len(variants)
        assert got[len(variants):] == benign
        # The node kept the packet that carried the exploit with the alert (traceback needs it).
        shown = d.request("alert", id=alerts[0]["alert_id"])
        assert shown["packets"] >= 1
    finally:
        sink.close()
        cli.close()
        d.close()
