"""The daemon's filter manager: the store leads, the kernel follows."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from filters.condition import Filter, General, Specific
from node.daemon.filters import filter_from_json

SID = bytes(range(32))


def spec(value: bytes, port: int = 1434) -> dict[str, Any]:
    return Filter(SID, "resolver", "udp", port, Specific(3, value)).to_json()


def test_filter_json_round_trip_and_tampering() -> None:
    d = spec(b"\x01\x02")
    f = filter_from_json(d)
    assert f.to_json() == d
    with pytest.raises(ValueError, match="does not match"):
        filter_from_json({**d, "id": "0" * 16})
    with pytest.raises(ValueError):
        filter_from_json({**d, "port": 0})
    with pytest.raises(ValueError):
        filter_from_json({**d, "proto": "icmp"})
    with pytest.raises(ValueError):
        filter_from_json({**d, "condition": {"specific": {"offset": -1, "value": "00"}}})
    with pytest.raises(ValueError):
        filter_from_json("x")  # type: ignore[arg-type]


def test_install_records_first_and_skips_what_is_there(parts_factory: Any) -> None:
    p = parts_factory()

    async def main() -> None:
        assert await p.filters.install([spec(b"a"), spec(b"b")], alert_id="aa") == \
            [filter_from_json(spec(b"a")).filter_id, filter_from_json(spec(b"b")).filter_id]
        assert await p.filters.install([spec(b"a")], alert_id="bb") == []  # no second batch
        assert [c[0] for c in p.table.calls] == ["install"]

    asyncio.run(main())
    assert len(p.store.filters(state="installed")) == 2
    assert p.types().count("filter.installed") == 2


def test_short_installs_run_on_the_loop_when_the_kernel_thread_is_idle(
        parts_factory: Any) -> None:
    """An alert's filter into a table the backend knows is one short batch: done on the
    loop, not handed to the kernel's thread (two wake-ups); anything else goes to that thread,
    and so does a short one while the thread is busy (one libnftables context, one user)."""
    p = parts_factory()
    loop_thread = threading.current_thread().name

    async def main() -> None:
        await p.filters.install([spec(b"a")], alert_id=None)  # backend must list first
        p.table.knows_table = True
        await p.filters.install([spec(b"b")], alert_id=None)
        await p.filters.install([spec(b"c"), spec(b"d"), spec(b"e")], alert_id=None)
        listing = asyncio.ensure_future(p.filters.counters(max_age=0))  # on the thread
        await asyncio.sleep(0)
        await p.filters.install([spec(b"f")], alert_id=None)
        assert len(await listing) == 5

    asyncio.run(main())
    on_loop = [t == loop_thread for t in p.table.threads]
    assert on_loop == [False, True, False, False]
    assert len(p.table.installed) == 6


def test_the_kernel_thread_is_busy_until_its_call_ends_even_if_nobody_waits(
        parts_factory: Any) -> None:
    """A caller that gives up (cancelled) leaves its call running on the thread: a short
    install meanwhile still goes to the thread, behind it, never beside it."""
    p = parts_factory()
    p.table.knows_table = True
    p.table.hold = threading.Event()
    loop_thread = threading.current_thread().name

    async def main() -> None:
        listing = asyncio.ensure_future(p.filters.counters(max_age=0))
        await asyncio.sleep(0.05)  # the listing waits on the thread
        listing.cancel()
        install = asyncio.ensure_future(p.filters.install([spec(b"a")], alert_id=None))
        await asyncio.sleep(0.05)
        assert p.table.threads == []  # queued behind the listing, not run beside it
        p.table.hold.set()
        await install
        await p.filters.install([spec(b"b")], alert_id=None)  # the thread is idle again

    asyncio.run(main())
    assert [t == loop_thread for t in p.table.threads] == [False, True]


def test_kernel_failure_keeps_the_store_and_reconcile_repairs(parts_factory: Any) -> None:
    p = parts_factory()

    async def main() -> None:
        p.table.fail = True
        await p.filters.install([spec(b"a")], alert_id=None)
        assert p.table.installed == {} and p.filters.kernel_errors == 1
        assert not await p.filters.in_step()
        p.table.fail = False
        out = await p.filters.reconcile()
        assert out == {"desired": 1, "added": 1, "removed": 0}
        assert await p.filters.in_step()

    asyncio.run(main())
    assert "filter.error" in p.types() and "filter.reconciled" in p.types()


def test_reconcile_removes_strays_and_restores_missing(parts_factory: Any) -> None:
    p = parts_factory()

    async def main() -> None:
        await p.filters.install([spec(b"a")], alert_id=None)
        stray = filter_from_json(spec(b"zz"))
        p.table.installed = {stray.filter_id: stray}  # someone flushed and added by hand
        out = await p.filters.reconcile()
        assert out["added"] == 1 and out["removed"] == 1
        assert set(p.table.installed) == {filter_from_json(spec(b"a")).filter_id}

    asyncio.run(main())


def test_remove_and_expire(parts_factory: Any) -> None:
    p = parts_factory()
    now = [1000.0]
    p.filters.clock = lambda: now[0]
    p.filters.expire_after_s = 60

    async def main() -> None:
        a, b = filter_from_json(spec(b"a")).filter_id, filter_from_json(spec(b"b")).filter_id
        await p.filters.install([spec(b"a"), spec(b"b")], alert_id=None)
        assert await p.filters.remove([a, "nope"]) == [a]
        assert await p.filters.remove([a]) == []  # not installed any more
        now[0] += 61
        p.store.record_filter(spec(b"b"), alert_id=None, expires=now[0] - 1)
        assert await p.filters.expire() == [b]
        assert p.table.installed == {}
        assert p.store.filter(a).removed_by == "operator"  # type: ignore[union-attr]
        assert p.store.filter(b).state == "expired"  # type: ignore[union-attr]

    asyncio.run(main())


def test_userspace_filters_are_tracked_in_place(parts_factory: Any) -> None:
    p = parts_factory()
    from filters.condition import Field, Overflow

    general = Filter(SID, "httpd", "tcp", 80, General(
        (), Overflow("terminated", Field(4, ord("?")), 200, (0, 0x20), 0, True), True)).to_json()
    held = p.filters.userspace  # the stack keeps this reference

    async def main() -> None:
        await p.filters.install([general], alert_id=None)
        assert held.check("tcp", 80, b"GET /x?" + b"A" * 300) is not None
        await p.filters.reconcile()
        assert p.filters.userspace is held and len(held) == 1
        rows = await p.filters.listing()
        assert rows[0]["userspace"] is True and rows[0]["packets"] == 3
        await p.filters.remove([rows[0]["filter_id"]])
        assert len(held) == 0

    asyncio.run(main())
