"""Real node daemons (``herdwall node run``) in testbed host namespaces.

Each node gets a state directory of its own under one temporary root (``/tmp/hw-nodes-…``),
a config written from a ``NodeSpec`` (protected manifests, detector on or off, overlay bind and
bootstrap peers, throttle settings) and runs as a child process inside its host's namespace
(``ip netns exec``), in a session of its own so a Ctrl-C at the terminal reaches only us; we
stop the nodes ourselves, SIGTERM first, by pid. Whatever a node puts in the kernel (table
``inet herdwall``, the NFQUEUE rules) lives in that host's namespace and goes with it.

The control socket is a Unix socket in the state directory: it is reachable from the machine's
own namespace (filesystem sockets do not belong to a network namespace), so status, events and
filters are read from here without entering the hosts.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.testbed.netns import Namespace, NetnsError
from node.testbed.runner import stop_process
from sca.services import manifest_path

OVERLAY_PORT = 7400
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NodeSpec:
    """What one node runs with. ``settings``: extra config, section -> key -> value (TOML
    scalars and lists of strings), merged over what the other fields say."""

    ns: str
    addr: str
    detector: bool = False
    services: Sequence[str] = ("resolver",)
    bootstrap: Sequence[str] = ()
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


def config_text(state_dir: Path, sections: dict[str, dict[str, Any]]) -> str:
    """A node config file: ``state_dir`` and the sections given (section -> key -> value)."""
    lines = [f"state_dir = {_toml_value(state_dir)}"]
    for name, keys in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def config_toml(spec: NodeSpec, state_dir: Path) -> str:
    """The node's config file (see ``herdwall node config --defaults`` for every key)."""
    sections: dict[str, dict[str, Any]] = {
        "services": {"manifests": [str(manifest_path(s)) for s in spec.services]},
        "detector": {"enabled": spec.detector},
        "overlay": {"bind": f"{spec.addr}:{OVERLAY_PORT}", "bootstrap": list(spec.bootstrap)},
    }
    for name, keys in spec.settings.items():
        sections.setdefault(name, {}).update(keys)
    return config_text(state_dir, sections)


class NodeProc:
    """One daemon: ``start()``, ``wait_ready()``, ``request(cmd)``, ``events()``, ``stop()``."""

    def __init__(self, spec: NodeSpec, root: Path) -> None:
        if not spec.ns.startswith("hw"):
            raise NetnsError(f"{spec.ns}: nodes of the testbed run only in hw… namespaces")
        self.spec = spec
        self.dir = root / spec.ns
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "node.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._seen: list[dict[str, Any]] = []
        self._stamps: list[float] = []  # each seen event's timestamp_s
        self._offset = 0

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def event_log(self) -> Path:
        return self.state_dir / "events.jsonl"

    @property
    def output_path(self) -> Path:
        return self.dir / "node.out"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_toml(self.spec, self.state_dir), encoding="utf-8")
        self._log = self.output_path.open("wb")
        argv = [sys.executable, "-m", "node", "node", "run", "--config", str(self.config_path)]
        self.proc = Namespace.attach(self.spec.ns).popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        from node.daemon.control import ControlClient

        with ControlClient(self.socket_path, timeout=timeout) as c:
            return c.request(cmd, **args)

    def ready(self) -> bool:
        from node.daemon.control import ControlError, NoNode

        try:
            return self.request("status", timeout=2).get("node", {}).get("state") == "running"
        except (NoNode, ControlError, OSError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise NetnsError(f"node in {self.spec.ns} exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise NetnsError(f"node in {self.spec.ns} not ready in {timeout:.0f} s: "
                                 f"{self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 400) -> str:
        try:
            return " ".join(self.output_path.read_text(errors="replace")[-n:].split())
        except OSError:
            return "(no output)"

    def events(self) -> list[dict[str, Any]]:
        """The node's event log so far, read on from where the last call stopped (whole lines
        only: the node flushes line by line)."""
        try:
            with self.event_log.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return self._seen
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    self._seen.append(rec)
                    ts = rec.get("timestamp_s", 0)
                    self._stamps.append(ts if isinstance(ts, int | float) else 0)
        self._offset += end
        return self._seen

    def first(self, event_type: str, since: float = 0.0, **fields: Any) -> dict[str, Any] | None:
        """The first event of ``event_type`` at or after ``since`` whose fields match."""
        seen = self.events()
        # Benches poll this every few ms while a measurement runs: scanning the whole log each
        # time took a tenth of the machine's CPU from the nodes being measured. The log is in
        # time order (one process writes it as events happen), so start at ``since``.
        for i in range(bisect.bisect_left(self._stamps, since), len(seen)):
            rec = seen[i]
            if rec.get("event_type") == event_type and rec.get("timestamp_s", 0) >= since \
                    and all(rec.get(k) == v for k, v in fields.items()):
                return rec
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the node leaves cleanly), then SIGKILL if it does not within ``timeout``."""
        p = self.proc
        if p is not None:
            # SIGKILL to its session: the node and its workers.
            stop_process(p, timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
        if self._log is not None:
            self._log.close()
            self._log = None


class Fleet:
    """Many nodes, started together and stopped together; the state root is removed on
    ``close()`` unless ``keep`` (then it is left for a look at the logs)."""

    def __init__(self, specs: Sequence[NodeSpec], root: Path | None = None,
                 keep: bool = False) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="hw-nodes-"))
        self.keep = keep
        self.nodes = [NodeProc(s, self.root) for s in specs]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        for n in self.nodes:
            n.start()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.wait_ready(max(1.0, deadline - time.monotonic()))

    def by_addr(self, addr: str) -> NodeProc:
        for n in self.nodes:
            if n.spec.addr == addr:
                return n
        raise KeyError(addr)

    def __iter__(self) -> Iterator[NodeProc]:
        return iter(self.nodes)

    def close(self) -> None:
        # SIGTERM to all first, then wait: they shut down side by side, not one by one.
        for n in self.nodes:
            if n.alive():
                assert n.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
