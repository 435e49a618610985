"""End to end on Vigilante's five hosts with real node daemons: the exploit reaches the
detector over the wire, the alert goes through three relays that each verify it before
forwarding (the wiring allows no other path), the specific filter becomes active at the
vulnerable host, and the exploit then fails there while benign lookups still get answers."""

from __future__ import annotations

import random
import time

import pytest

from node.testbed import leftovers
from node.testbed.e2e import ChainRun, variant
from sca.services import traffic

pytestmark = [pytest.mark.netns, pytest.mark.slow]
NEEDED = ("stack", "overlay")


def test_exploit_at_detector_filter_at_vulnerable_host_through_three_relays() -> None:
    with ChainRun(services=True, join_s=30) as run:
        names = run.chain.namespaces() if run.chain else []
        comps = run.components()
        missing = [c for c in NEEDED if not any(c in x for x in comps)]
        if missing:
            pytest.skip(f"the node daemon does not run {', '.join(missing)} yet "
                        f"(components: {', '.join(comps) or 'none'})")
        assert not run.notes, run.notes  # every node found its overlay neighbours
        assert run.harness is not None
        # Before: the vulnerable host answers lookups, and nothing protects it.
        assert (run.ask_vul(b"\x04ARCHIVE\x00") or b"").startswith(b"\x05")
        # The canonical exploit (Slammer's one datagram) at the detector. In the strict chain
        # the relays beyond r1 may get the alert only from the overlay's anti-entropy
        # (seconds), hence the generous timeout.
        sample = run.measure("resolver", None, timeout=90)
        assert sample.relays_verified == 3, sample.arrivals  # r1, r2, r3 verified it first
        canonical = traffic("resolver").exploit()[0].data
        assert run.ask_vul(canonical, timeout=0.5) is None  # dropped by the specific filter
        assert run.harness.infected() == []
        reply = run.ask_vul(b"\x04MSSQLSERVER\x00")
        assert reply is not None and b"InstanceName;MSSQLSERVER;" in reply
        assert (run.ask_vul(b"\x02") or b"").count(b"ServerName;") == 4
        # The general filter follows (each node derives it itself): a fresh variant, another
        # target and filler, dies there too.
        general = run.node("vul").first("filter.installed", kind="general")
        deadline = time.monotonic() + 60
        while general is None and time.monotonic() < deadline:
            time.sleep(0.2)
            general = run.node("vul").first("filter.installed", kind="general")
        assert general is not None
        assert run.ask_vul(variant("resolver", random.Random(99))[-1].data, timeout=0.5) is None
        assert run.harness.infected() == []
    assert names and not set(names) & set(leftovers())
