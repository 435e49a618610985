"""A real ``herdwall node run`` process for tests: its own config and state directory in a temp
folder, optionally inside a network namespace (``ip netns exec``), stopped (SIGTERM, then
SIGKILL) when the test ends. The control socket is a path in the temp folder, reachable from
the test whatever namespace the node runs in."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node.daemon.control import ControlClient, ControlError, NoNode
from node.testbed.daemons import config_text
from sca.services import manifest_path

HERDWALL = str(Path(sys.executable).parent / "herdwall")


def write_config(path: Path, state_dir: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(config_text(state_dir, sections))
    return path


def manifest(name: str) -> str:
    return str(manifest_path(name))


class Daemon:
    def __init__(self, tmp: Path, *, netns: str | None = None,
                 sections: dict[str, dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.netns = netns
        self.state = tmp / "state"
        base: dict[str, dict[str, Any]] = {"overlay": {"enabled": False},
                                           "kernel": {"enabled": netns is not None}}
        for k, v in (sections or {}).items():
            base.setdefault(k, {}).update(v)
        self.config = write_config(tmp / "node.toml", self.state, base)
        self.socket = self.state / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.env: dict[str, str] = {}  # extra environment (HERDWALL_DEBUG=1 to see tracebacks)

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def start(self, timeout: float = 60) -> Daemon:
        self.runs += 1
        with open(self.tmp / f"out.{self.runs}", "wb") as out, \
                open(self.tmp / f"err.{self.runs}", "wb") as err:  # the child keeps its copies
            self.proc = subprocess.Popen([*self._prefix(), HERDWALL, "node", "run", "--config",
                                          str(self.config)], stdout=out, stderr=err,
                                         env=os.environ | self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.proc.returncode}: {self.stderr()}")
            try:
                with ControlClient(self.socket, timeout=5) as c:
                    if c.request("status")["node"]["state"] == "running":
                        return self
            except (NoNode, ControlError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node did not come up: {self.stderr()}")

    def stdout(self) -> str:
        return (self.tmp / f"out.{self.runs}").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.tmp / f"err.{self.runs}").read_text(errors="replace")

    def client(self) -> ControlClient:
        return ControlClient(self.socket).connect()

    def request(self, cmd: str, **args: Any) -> Any:
        with self.client() as c:
            return c.request(cmd, **args)

    def wait_for(self, predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        # ip netns exec execs the node in place, so the pid is the node's own.
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.stop(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def cli(self, *args: str, netns: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """``herdwall ARGS --config ...`` (inside the node's namespace unless ``netns`` is
        False)."""
        prefix = self._prefix() if netns else []
        return subprocess.run([*prefix, HERDWALL, *args, "--config", str(self.config)],
                              capture_output=True, timeout=timeout, input=input)

    def nft(self, *args: str) -> str:
        assert self.netns is not None
        return subprocess.run(["ip", "netns", "exec", self.netns, "nft", *args],
                              capture_output=True, text=True, timeout=30).stdout
