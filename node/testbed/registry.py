"""Testbeds that outlive the command that made them: ``herdwall testbed up|down|status``.

``up`` builds a layout (``node.testbed.hosts``), optionally starts node daemons in the hosts
(``node.testbed.daemons``) and the vulnerable services (the worm harness without a release),
records all of it in ``<registry>/<name>.json`` and returns; the namespaces and processes stay.
``down`` stops what a record names (by pid, after checking the pid is still the process we
started) and deletes its namespaces and files; it also removes **leftovers**: namespaces named
``hw-<pid>-…`` whose making process is gone and that hold no process (a crashed test or demo).
A namespace whose maker is alive belongs to someone's running test and is never touched;
``--all`` removes every ``hw-`` namespace that holds no process, whoever made it.

The registry folder is ``$HERDWALL_TESTBED_DIR``, else ``/run/herdwall-testbeds`` (root), else
a folder in the temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.testbed.netns import PREFIX, leftovers
from sca.atomic_file import write_atomic

_MAKER = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_NAME = re.compile(r"^[a-z0-9]{1,8}$")


def registry_dir() -> Path:
    env = os.environ.get("HERDWALL_TESTBED_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/herdwall-testbeds")
    return Path(tempfile.gettempdir()) / "herdwall-testbeds"


@dataclass
class Record:
    name: str
    layout: str
    created: float
    namespaces: list[str]
    hosts: list[dict[str, str]]  # role, ns, addr
    root: str  # folder with node states, harness spec and logs
    processes: list[dict[str, Any]] = field(default_factory=list)  # kind, pid, ns, socket

    def save(self) -> Path:
        d = registry_dir()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = d / f"{self.name}.json"
        # Whole or not at all: a record that cannot be read back is a testbed forgotten.
        write_atomic(path, json.dumps(self.__dict__, indent=1).encode(), 0o600)
        return path

    @classmethod
    def load(cls, path: Path) -> Record:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def records() -> list[Record]:
    d = registry_dir()
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            out.append(Record.load(p))
    return out


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"testbed name {name!r}: 1 to 8 lowercase letters or digits")
    return name


def ns_pids(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie (a child of this very process that ended, when ``up`` and
    ``down`` run in one process, stays a zombie until reaped: reap it here)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _ours(proc: dict[str, Any], root: str) -> bool:
    """The pid still runs what we started: its command line names a file in the record's
    folder (a recycled pid would not)."""
    return _pid_alive(int(proc["pid"])) and root in _cmdline(int(proc["pid"]))


def stop_processes(rec: Record, timeout: float = 10.0) -> int:
    """SIGTERM to each recorded process that is still ours, then SIGKILL to its session after
    ``timeout``. Returns how many were running."""
    live = [p for p in rec.processes if _ours(p, rec.root)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_pid_alive(int(p["pid"])) for p in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in live:
        if _ours(p, rec.root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(p["pid"]), signal.SIGKILL)
    return len(live)


def delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def remove(rec: Record) -> dict[str, Any]:
    stopped = stop_processes(rec)
    present = set(leftovers())
    gone = [n for n in rec.namespaces if n in present]
    for n in gone:
        delete_namespace(n)
    shutil.rmtree(rec.root, ignore_errors=True)
    with contextlib.suppress(OSError):
        (registry_dir() / f"{rec.name}.json").unlink()
    return {"name": rec.name, "processes_stopped": stopped, "namespaces_deleted": len(gone)}


@dataclass
class Leftover:
    name: str
    maker: int | None  # the pid in the name, if it has one
    maker_alive: bool
    pids: list[int]

    @property
    def orphan(self) -> bool:
        """Safe to delete: its maker is gone and nothing runs inside it."""
        return self.maker is not None and not self.maker_alive and not self.pids


def scan_leftovers(known: set[str]) -> list[Leftover]:
    out = []
    for name in leftovers():
        if name in known:
            continue
        m = _MAKER.match(name)
        maker = int(m.group(1)) if m else None
        out.append(Leftover(name, maker, maker is not None and _pid_alive(maker),
                            ns_pids(name)))
    return out


def down(name: str | None = None, *, everything: bool = False) -> dict[str, Any]:
    """Remove testbed ``name`` (None: every recorded one) and the orphaned leftovers
    (``everything``: every ``hw-`` namespace with no process inside)."""
    recs = records()
    if name is not None:
        recs = [r for r in recs if r.name == name]
        if not recs:
            raise ValueError(f"no testbed named {name!r} is up")
    removed = [remove(r) for r in recs]
    known = {n for r in records() for n in r.namespaces}
    deleted, kept = [], []
    if name is None or everything:
        for lo in scan_leftovers(known):
            if lo.orphan or (everything and not lo.pids):
                delete_namespace(lo.name)
                deleted.append(lo.name)
            else:
                kept.append({"name": lo.name, "maker_alive": lo.maker_alive,
                             "pids": lo.pids})
    return {"testbeds": removed, "leftovers_deleted": deleted, "leftovers_kept": kept}


def status() -> dict[str, Any]:
    recs = records()
    present = set(leftovers())
    beds = []
    for r in recs:
        procs = []
        for p in r.processes:
            alive = _ours(p, r.root)
            entry = {**p, "alive": alive}
            if alive and p.get("socket"):
                from node.daemon.control import node_running

                entry["answers"] = node_running(p["socket"])
            procs.append(entry)
        beds.append({"name": r.name, "layout": r.layout, "created": r.created,
                     "namespaces": len(r.namespaces),
                     "namespaces_present": sum(n in present for n in r.namespaces),
                     "hosts": r.hosts, "processes": procs, "root": r.root})
    known = {n for r in recs for n in r.namespaces}
    others = [{"name": lo.name, "maker": lo.maker, "maker_alive": lo.maker_alive,
               "pids": lo.pids, "orphan": lo.orphan} for lo in scan_leftovers(known)]
    return {"registry": str(registry_dir()), "testbeds": beds, "other_namespaces": others}


def up(name: str, *, layout: str = "worm", vulnerable: int = 16, detectors: int = 2,
       dark: bool = True, nodes: bool = False, services: bool = False,
       settings: dict[str, dict[str, Any]] | None = None) -> Record:
    """Build testbed ``name`` and leave it up (see the module doc); on any failure everything
    made so far is removed again."""
    from node.testbed.daemons import Fleet
    from node.testbed.hosts import POOL, Chain, WormBed
    from node.testbed.runner import HarnessProc
    from node.testbed.worm import HostSpec

    check_name(name)
    if any(r.name == name for r in records()):
        raise ValueError(f"a testbed named {name!r} is up already (herdwall testbed down "
                         f"{name})")
    if layout not in ("worm", "chain"):
        raise ValueError("layout is worm or chain")
    root = Path(tempfile.mkdtemp(prefix=f"hw-tb-{name}-"))
    bed: WormBed | Chain | None = None
    rec = Record(name, layout, time.time(), [], [], str(root))
    try:
        if layout == "worm":
            bed = WormBed(vulnerable, detectors, dark=dark, tag=name)
            bed.wait_ready()
            rec.hosts = [{"role": r.name, "ns": r.ns.name, "addr": r.addr} for r in bed.roles]
            worm_hosts = bed.specs()
        else:
            bed = Chain(tag=name)
            rec.hosts = [{"role": h.name, "ns": h.ns.name, "addr": ",".join(h.addrs)}
                         for h in bed.hosts]
            # Only the vulnerable host runs the service; the detector's side is the node's.
            worm_hosts = [HostSpec(bed["vul"].ns.name, bed["vul"].left or "", "vulnerable")]
        rec.namespaces = bed.namespaces()
        rec.save()  # recorded early: a crash from here on still leaves something down finds
        if nodes:
            fleet = Fleet(bed.node_specs(settings), root=root / "nodes", keep=True)
            try:
                fleet.start()
            finally:
                rec.processes += [{"kind": "node", "pid": n.proc.pid, "ns": n.spec.ns,
                                   "socket": str(n.socket_path)}
                                  for n in fleet if n.proc is not None]
                rec.save()
        if services:
            harness = HarnessProc(root, worm_hosts, pool=[POOL], release=False, tag="services",
                                  client_rate=0.0)
            harness.start()
            assert harness.proc is not None
            rec.processes.append({"kind": "services", "pid": harness.proc.pid, "ns": "",
                                  "report": str(harness.out_path)})
            rec.save()
            harness.wait_event("ready", 30)
        return rec
    except BaseException:
        remove(rec)
        if bed is not None:
            bed.close()
        raise
