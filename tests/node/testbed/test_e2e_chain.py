"""End to end on Vigilante's five hosts with real node daemons: the exploit reaches the
detector over the wire, the alert goes through three relays that each verify it before
forwarding (the wiring allows no other path), the specific filter becomes active at the
vulnerable host, and the exploit then fails there while benign lookups still get answers."""

from __future__ import annotations

import random

import pytest

from node.testbed import leftovers
from node.testbed.e2e import ChainRun
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
        sample = run.measure("resolver", random.Random(5), general=True, timeout=20)
        assert sample.relays_verified == 3  # r1, r2 and r3 each verified it
        assert sample.specific_ms > 0 and sample.general_ms is not None
        # After: the canonical exploit and a fresh variant die at the filters; benign passes.
        for exploit in (traffic("resolver").exploit()[0].data,
                        traffic("resolver").exploit(random.Random(99))[-1].data):
            assert run.ask_vul(exploit, timeout=0.5) is None
        assert run.harness.infected() == []
        reply = run.ask_vul(b"\x04MSSQLSERVER\x00")
        assert reply is not None and b"InstanceName;MSSQLSERVER;" in reply
        assert (run.ask_vul(b"\x02") or b"").count(b"ServerName;") == 4
    assert names and not set(names) & set(leftovers())
