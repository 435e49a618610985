"""`herdwall monitor` in a real terminal (tmux) against a real node in a namespace: it draws,
refreshes as the node changes, and quits cleanly on q and on Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sca.services import traffic

pytestmark = [pytest.mark.netns, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
HERDWALL = str(Path(sys.executable).parent / "herdwall")


def _daemon_module() -> Any:
    if "daemon_proc" in sys.modules:
        return sys.modules["daemon_proc"]
    spec = importlib.util.spec_from_file_location(
        "daemon_proc", HERE.parent / "daemon" / "daemon_proc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["daemon_proc"] = mod
    spec.loader.exec_module(mod)
    return mod


class Tmux:
    """A tmux server of our own (its own socket name), killed afterwards."""

    def __init__(self) -> None:
        self.name = f"hw-test-{os.getpid()}-{secrets.token_hex(3)}"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True,
                              text=True, timeout=30, check=check)

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target).stdout

    def wait_screen(self, target: str, *words: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen(target)
            if all(w in text for w in words):
                return text
            time.sleep(0.2)
        size = self("display", "-p", "-t", target, "#{window_width}x#{window_height}",
                    check=False).stdout
        raise AssertionError(f"{words} not on screen ({size}):\n{text}")

    def alive(self, target: str) -> bool:
        return self("has-session", "-t", target, check=False).returncode == 0

    def close(self) -> None:
        self("kill-server", check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing (scripts/setup installs it)")
        pytest.skip("tmux is missing (scripts/setup installs it)")
    t = Tmux()
    yield t
    t.close()


def test_monitor_in_tmux(netns: Any, tmp_path: Path, tmux: Tmux) -> None:
    dp = _daemon_module()
    daemon = dp.Daemon(tmp_path, netns=netns.name, sections={
        "services": {"manifests": [dp.manifest("resolver")]}, "detector": {"enabled": True}})
    try:
        # Started before the node: it says so, then picks the node up.
        done = tmp_path / "exit-q"
        # env -u: a COLUMNS/LINES exported by the test runner would override the pane's size.
        mon = f"env -u COLUMNS -u LINES {HERDWALL} monitor --config {daemon.config}"
        cmd = f"{mon} --interval 0.5; echo $? > {done}"
        tmux("new-session", "-d", "-s", "mon", "-x", "160", "-y", "50", cmd)
        tmux.wait_screen("mon", "No herdwall node is running")
        daemon.start()
        node_id = daemon.request("status")["node"]["id"]
        tmux.wait_screen("mon", node_id[:16], "identity and peers", "detector", "throttle",
                         "resolver udp/1434")
        # It refreshes: an exploit shows up as a detection, a filter and an event.
        messages = traffic("resolver").exploit(random.Random(1))
        daemon.request("detector.submit", service="resolver",
                       messages=[[m.connection, m.data.hex()] for m in messages])
        screen = tmux.wait_screen("mon", "alert.detected", "filter.installed", "specific",
                                  "1 (1 alert(s))")
        assert "Traceback" not in screen
        tmux("send-keys", "-t", "mon", "q")
        deadline = time.monotonic() + 15
        while tmux.alive("mon") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tmux.alive("mon")
        assert done.read_text().strip() == "0"

        # Ctrl-C quits cleanly too, and leaves the terminal usable (echo back on).
        done = tmp_path / "exit-c"
        tmux("new-session", "-d", "-s", "mon2", "-x", "160", "-y", "50",
             f"{mon}; echo $? > {done}; "
             "stty -a | grep -o ' echo ' > " + str(tmp_path / "stty") + "; sleep 5")
        tmux.wait_screen("mon2", "identity and peers")
        tmux("send-keys", "-t", "mon2", "C-c")
        deadline = time.monotonic() + 15
        # The shell creates the file for the redirect before echo writes to it: wait for
        # the status itself.
        while not (done.exists() and done.read_text().strip()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.read_text().strip() == "0"
        deadline = time.monotonic() + 5
        while not (tmp_path / "stty").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        assert (tmp_path / "stty").read_text().strip() == "echo"
    finally:
        daemon.close()
