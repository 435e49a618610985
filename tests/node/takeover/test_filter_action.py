"""The filter action ``takeover``: FilterTable hands a TCP filter's flows to the takeover queue
(rules from ``node.takeover.rules``), lists and removes them like any filter."""

from __future__ import annotations

import pytest

from filters.condition import Field, Filter, General, Overflow, Pin, Specific
from filters.nft import FilterTable, compile_filter
from node.kernel.marks import MASK, QUEUE_STACK
from node.kernel.nft import NftTable
from node.takeover.rules import compile_takeover

TCP = Filter(b"\x01" * 32, "httpd", "tcp", 8080,
             General((Pin(0, 0x47),), Overflow("terminated", Field(5, 0x3F), 100, (0, 0x20))))
UDP = Filter(b"\x02" * 32, "resolver", "udp", 1434, Specific(73, b"\x35\x10\x40\x00"))


def test_takeover_action_compiles_to_the_takeover_rules() -> None:
    c = compile_filter(TCP, queue_mark=QUEUE_STACK, mark_mask=MASK, tcp_action="takeover",
                       takeover=compile_takeover)
    assert c.userspace and any("takeover" in r for r in c.rules)
    assert any(f"hw:{TCP.filter_id}" in r for r in c.rules)
    # UDP keeps dropping; without the compiler the action is refused, not silently changed.
    assert compile_filter(UDP, queue_mark=QUEUE_STACK, tcp_action="takeover").element
    with pytest.raises(ValueError):
        compile_filter(TCP, queue_mark=QUEUE_STACK, tcp_action="takeover")


@pytest.mark.netns
def test_takeover_filters_install_list_and_remove(netns) -> None:  # type: ignore[no-untyped-def]
    nft = NftTable(netns.name)
    nft.ensure()
    table = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK,
                        tcp_action="takeover", takeover=compile_takeover)
    table.install([TCP, UDP])
    assert {i.filter_id for i in table.list()} == {TCP.filter_id, UDP.filter_id}
    text = nft.query_text("list table inet herdwall")
    assert "takeover_watch" in str(text)
    table.remove([TCP.filter_id])
    assert {i.filter_id for i in table.list()} == {UDP.filter_id}
