"""The static iptables-nft rules that hand marked packets to NFQUEUE.

This kernel has no nft ``queue`` statement, so queueing is a handful of fixed rules in the
``mangle`` table, one per (hook, mark) pair, for IPv4 and IPv6::

    iptables -t mangle -A INPUT -m mark --mark QUEUE_STACK/MASK \
        -j NFQUEUE --queue-num 0 --queue-bypass
    ... INPUT, FORWARD, OUTPUT x QUEUE_STACK (queue 0), QUEUE_THROTTLE (queue 1)

They never change while the node runs: which packets carry which mark is decided in
``inet herdwall`` (``node.kernel.nft``), at a priority before mangle's. ``--queue-bypass`` is
the default (fail-open: with no reader bound the packets pass); ``fail_open=False`` leaves it
out (fail-closed: with no reader they are dropped).

``install()`` is idempotent (``-C`` before ``-A``) and ``remove()`` deletes every copy of every
rule in either variant. ``netns`` runs the commands with ``ip netns exec`` (tests); without it
they act where the process is (a real node, run by a person).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from node.kernel.marks import MASK, QUEUES

CHAINS = ("INPUT", "FORWARD", "OUTPUT")
TOOLS = ("iptables", "ip6tables")


class QueueRuleError(RuntimeError):
    """iptables refused a rule."""


class QueueRules:
    def __init__(self, *, netns: str | None = None, fail_open: bool = True,
                 queues: Mapping[int, int | tuple[int, int]] | None = None,
                 chains: Sequence[str] = CHAINS, tools: Sequence[str] = TOOLS) -> None:
        self.netns = netns
        self.fail_open = fail_open
        self.queues = dict(QUEUES if queues is None else queues)
        self.chains = tuple(chains)
        self.tools = tuple(tools)

    def _run(self, tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        argv = [tool, "-w", "5", "-t", "mangle", *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def rule(self, chain: str, mark: int, queue: int | tuple[int, int],
             bypass: bool | None = None) -> list[str]:
        """The rule spec (after ``-A CHAIN``). ``queue``: a number, or the first and last of a
        range fanned out by CPU (a packet goes to the queue of the CPU that handles it)."""
        spec = [chain, "-m", "mark", "--mark", f"{mark:#x}/{MASK:#x}", "-j", "NFQUEUE"]
        if isinstance(queue, tuple) and queue[1] > queue[0]:
            spec += ["--queue-balance", f"{queue[0]}:{queue[1]}", "--queue-cpu-fanout"]
        else:
            spec += ["--queue-num", str(queue[0] if isinstance(queue, tuple) else queue)]
        if self.fail_open if bypass is None else bypass:
            spec.append("--queue-bypass")
        return spec

    def specs(self, bypass: bool | None = None) -> list[list[str]]:
        return [self.rule(c, m, q, bypass) for c in self.chains for m, q in self.queues.items()]

    def install(self) -> int:
        """Add the missing rules (the other variant's are removed first); return how many were
        added."""
        self._remove(bypass=not self.fail_open)
        added = 0
        for tool in self.tools:
            for spec in self.specs():
                if self._run(tool, ["-C", *spec]).returncode == 0:
                    continue
                r = self._run(tool, ["-A", *spec])
                if r.returncode != 0:
                    raise QueueRuleError(f"{tool} -A {' '.join(spec)}: {r.stderr.strip()}")
                added += 1
        return added

    def _remove(self, bypass: bool) -> int:
        removed = 0
        # A range's rule also in its one-queue form (what a node installed before the range).
        single = [self.rule(c, m, q[0], bypass) for c in self.chains
                  for m, q in self.queues.items() if isinstance(q, tuple) and q[1] > q[0]]
        for tool in self.tools:
            for spec in self.specs(bypass) + single:
                for _ in range(100):  # every copy, but never loop forever
                    if self._run(tool, ["-D", *spec]).returncode != 0:
                        break
                    removed += 1
        return removed

    def remove(self) -> int:
        """Delete every herdwall queue rule, in both variants; return how many."""
        return self._remove(True) + self._remove(False)

    def present(self) -> list[str]:
        """The NFQUEUE rules now in the mangle table (``-S`` lines), IPv4 and IPv6."""
        lines = []
        for tool in self.tools:
            out = self._run(tool, ["-S"]).stdout
            lines += [f"{tool}: {line}" for line in out.splitlines() if "NFQUEUE" in line]
        return lines
