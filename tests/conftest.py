"""Shared test setup: hypothesis profiles and network namespaces for `netns` tests.

Network namespaces: the ``netns`` fixture gives a fresh namespace named ``hw-<pid>-<random>``
and deletes it afterwards, also when the test fails; ``netns_factory`` makes as many as a test
needs. A test marked ``netns`` (or using these fixtures) is skipped when namespaces cannot be
made here (not root, no ``ip``), unless the environment variable ``CI`` is set: then it fails,
so CI can never pass by skipping them. Nothing here touches the machine's own namespace.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

# Shared 2-core machines stall at random: no per-example deadlines. CI runs are derandomized so
# a failure there can be reproduced.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

pytest_plugins = ["pytester"]

NETNS_PREFIX = "hw-"


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the `ip` command)"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class Netns:
    """A network namespace made for one test."""

    name: str

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS...``: iproute2 acting inside the namespace."""
        return subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True,
                              check=check, timeout=30)

    def run(self, *argv: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespace (``ip netns exec NAME ARGV...``)."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, check=check, timeout=timeout)


def _delete(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = netns_unavailable()
        if reason:
            _skip_or_fail(reason)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], Netns]]:
    """Call it to get a new namespace; all of them are deleted after the test."""
    reason = netns_unavailable()
    if reason:
        _skip_or_fail(reason)
    made: list[str] = []

    def make() -> Netns:
        name = f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            _skip_or_fail(f"cannot create network namespace: {result.stderr.strip()}")
        made.append(name)
        return Netns(name)

    try:
        yield make
    finally:
        for name in made:
            _delete(name)


@pytest.fixture
def netns(netns_factory: Callable[[], Netns]) -> Netns:
    """A fresh network namespace, deleted after the test."""
    return netns_factory()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Belt and braces: remove any namespace this very process made and somehow left behind.
    if netns_unavailable() is not None:
        return
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=30)
    mine = f"{NETNS_PREFIX}{os.getpid()}-"
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(mine):
            _delete(name)


@pytest.fixture
def testbed_factory() -> Iterator[Callable[..., object]]:
    """Call it (``n=2, mtu=1500, tag="tb"``) for a ``node.testbed.Testbed``: hosts
    10.77.0.<i+1>/16 on a bridge in a namespace of its own, ready to talk; every testbed made is
    deleted after the test, also when it fails."""
    reason = netns_unavailable()
    if reason:
        _skip_or_fail(reason)
    from node.testbed import Testbed

    made: list[Testbed] = []

    def make(n: int = 2, mtu: int = 1500, tag: str = "tb") -> Testbed:
        tb = Testbed(n, mtu=mtu, tag=tag)
        made.append(tb)
        tb.wait_ready()
        return tb

    try:
        yield make
    finally:
        for tb in made:
            tb.close()


@pytest.fixture
def testbed(testbed_factory: Callable[..., object]) -> object:
    """Two hosts on a bridge (see ``testbed_factory``)."""
    return testbed_factory()
