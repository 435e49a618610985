"""The worm harness as a child process (``python -m node.testbed.worm``), and its report.

The demo and the benchmark run the harness in a process of its own: the emulated services and
the scanners then do not compete with the caller's own loop (the live display, the nodes'
status polling) for the interpreter, and a stuck harness can be stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node.testbed.worm import DEFAULT_RATE, HostSpec


def stop_process(p: subprocess.Popen[Any], timeout: float, kill: Callable[[], None]) -> None:
    """SIGTERM (a node or harness leaves cleanly), then ``kill`` if it has not gone within
    ``timeout``."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            kill()
        p.wait(5)


class HarnessProc:
    """``start()`` writes the spec and starts the harness; ``events()`` reads its report so
    far; ``wait()`` / ``stop()`` end it (SIGTERM, then SIGKILL, by pid)."""

    def __init__(self, workdir: Path, hosts: Sequence[HostSpec], *, pool: Sequence[str],
                 rate: float = DEFAULT_RATE, seed: int = 1, client_rate: float = 5.0,
                 stop_when_all_infected: bool = False, release: bool = True,
                 duration: float | None = None, tag: str = "worm") -> None:
        self.dir = workdir
        self.spec = {"hosts": [h.__dict__ for h in hosts], "pool": list(pool), "rate": rate,
                     "seed": seed, "client_rate": client_rate,
                     "stop_when_all_infected": stop_when_all_infected, "release": release}
        self.duration = duration
        self.spec_path = workdir / f"{tag}.spec.json"
        self.out_path = workdir / f"{tag}.events.jsonl"
        self.err_path = workdir / f"{tag}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self._err: Any = None
        self._events: list[dict[str, Any]] = []
        self._offset = 0

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec_path.write_text(json.dumps(self.spec), encoding="utf-8")
        self.out_path.write_bytes(b"")
        argv = [sys.executable, "-m", "node.testbed.worm", "--spec", str(self.spec_path),
                "--out", str(self.out_path)]
        if self.duration is not None:
            argv += ["--duration", str(self.duration)]
        self._err = self.err_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def events(self) -> list[dict[str, Any]]:
        """Every event so far (read incrementally: only whole new lines are parsed)."""
        try:
            with self.out_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return self._events
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            with contextlib.suppress(ValueError):
                self._events.append(json.loads(line))
        self._offset += end
        return self._events

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_event(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(event)
            if found:
                return found[0]
            if not self.alive():
                raise RuntimeError(f"the worm harness ended before '{event}': {self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no '{event}' from the worm harness in {timeout} s")
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            return " ".join(self.err_path.read_text(errors="replace")[-600:].split())
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout, self.proc.kill)
        if self._err is not None:
            self._err.close()
            self._err = None
        self.events()


def summarize(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run in numbers: vulnerable hosts infected, when (seconds after the release), the
    sinks' first exploit, the benign client's answers."""
    released = next((e["t"] for e in events if e.get("event") == "released"), None)
    hosts = [e for e in events if e.get("event") == "host"]
    vul = [h for h in hosts if h.get("role") == "vulnerable"]
    infected = sorted(h["infected_t"] for h in vul if h.get("infected_t"))
    sinks = [h["first_exploit_t"] for h in hosts
             if h.get("role") == "sink" and h.get("first_exploit_t")]
    clients = [e for e in events if e.get("event") == "client"]

    def since(t: float | None) -> float | None:
        return round(t - released, 4) if t is not None and released is not None else None

    return {
        "vulnerable": len(vul),
        "infected": len(infected),
        "infected_frac": round(len(infected) / len(vul), 4) if vul else 0.0,
        "first_infection_s": since(infected[0]) if infected else None,
        "last_infection_s": since(infected[-1]) if infected else None,
        "first_detector_hit_s": since(min(sinks)) if sinks else None,
        "released_t": released,
        "scans": sum(h.get("scans", 0) for h in hosts),
        "benign_sent": sum(c.get("sent", 0) for c in clients),
        "benign_answered": sum(c.get("answered", 0) for c in clients),
    }
