"""The node's filters: the store says what should be installed, the kernel follows.

Every change is written to the store first (the desired state, committed), then applied to the
kernel in one atomic batch: a node killed in between finds the store ahead of the kernel at its
next start, and ``reconcile`` (``FilterTable.sync``) brings the kernel to it. An operator's
removal is stored as ``removed by operator`` and never undone by the pipeline (only
``install(force=True)``, i.e. an operator again).

The kernel side is any ``FilterBackend`` (``filters.nft.FilterTable`` on libnftables in a real
node; a recording fake in tests), called on one dedicated thread because a libnftables context
must not be shared between threads and a batch of 10,000 elements takes tens of milliseconds.
Filters nftables cannot express (``Compiled.userspace``) are also kept in ``userspace``, which
the stack's queue path consults.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from filters.condition import Filter, condition_from_json
from filters.userspace import UserspaceFilters

from .events import EventBus
from .store import StoreRunner

T = TypeVar("T")


class FilterBackend(Protocol):
    """What the daemon needs of the kernel side; ``filters.nft.FilterTable`` has it (and
    ``knows_table``: True when ``install(filters, look=False)`` can do without a listing,
    which the daemon then runs on its loop instead of the kernel thread)."""

    queue_mark: int

    def install(self, filters: Iterable[Filter], *, look: bool = True) -> Sequence[Any]: ...
    def remove(self, filter_ids: Iterable[str]) -> None: ...
    def sync(self, desired: Iterable[Filter]) -> None: ...
    def list(self) -> Sequence[Any]: ...  # items with filter_id, packets, bytes


def filter_from_json(d: dict[str, Any]) -> Filter:
    """The inverse of ``Filter.to_json``, strict: the id must match what the fields hash to,
    so a stored or received filter cannot claim one id and match something else."""
    if not isinstance(d, dict):
        raise ValueError("a filter is a JSON object")
    try:
        # Through JSON and back: a dict straight from Filter.to_json (say, across a process
        # pool) has tuples where the strict decoder expects the lists JSON gives.
        d = json.loads(json.dumps(d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"filter is not plain JSON: {e}") from None
    try:
        service_id = bytes.fromhex(str(d["service_id"]))
        proto, port, name = d["proto"], d["port"], d["service"]
        cond = condition_from_json(d["condition"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"filter JSON lacks or mistypes {e}") from None
    if len(service_id) != 32 or proto not in ("udp", "tcp") or not isinstance(name, str) \
            or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("filter JSON: bad service id, proto, port or name")
    f = Filter(service_id, name, proto, port, cond)
    if d.get("id") is not None and d["id"] != f.filter_id:
        raise ValueError(f"filter id {d.get('id')!r} does not match its condition")
    return f


def needs_userspace(f: Filter, queue_mark: int, mark_mask: int = 0xFFFFFFFF,
                    tcp_action: str = "reject with tcp reset", takeover: Any = None) -> bool:
    from filters.nft import compile_filter

    return compile_filter(f, queue_mark=queue_mark, mark_mask=mark_mask,
                          tcp_action=tcp_action, takeover=takeover).userspace


def table_action(tcp_action: str) -> dict[str, Any]:
    """``filters.nft.FilterTable``'s keyword arguments for the config's ``filters.tcp_action``
    ("drop", "reject" or "takeover")."""
    if tcp_action == "takeover":
        from node.takeover.rules import compile_takeover

        return {"tcp_action": "takeover", "takeover": compile_takeover}
    return {"tcp_action": {"drop": "drop", "reject": "reject with tcp reset"}[tcp_action]}


class FilterManager:
    def __init__(self, backend: FilterBackend | None, db: StoreRunner, bus: EventBus, *,
                 expire_after_s: float = 0.0, queue_mark: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.db = db
        self.bus = bus
        self.expire_after_s = expire_after_s
        self.queue_mark = backend.queue_mark if backend is not None else queue_mark
        self.mark_mask: int = getattr(backend, "mark_mask", 0xFFFFFFFF)
        self.clock = clock
        self.userspace = UserspaceFilters()
        self._userspace_ids: set[str] = set()
        self.kernel_errors = 0
        self.last_error = ""
        self._counters: dict[str, tuple[int, int]] = {}
        self._counters_at = 0.0
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nft")
        self._in_thread = 0  # calls handed to that thread and not finished
        self._count_lock = threading.Lock()  # that count changes on the thread too
        self._lock = asyncio.Lock()  # one kernel change at a time, in order
        # The store's view of which filters are installed and which an operator removed, held
        # in memory so that an install decides without waiting for the store (read at the
        # first install or reconcile, then kept in step by this manager, the store's only
        # writer of filters).
        self._installed: set[str] | None = None
        self._held_back: set[str] = set()

    async def _load(self) -> set[str]:
        if self._installed is None:
            rows = await self.db(self.db.store.filters)
            self._installed = {r.filter_id for r in rows if r.state == "installed"}
            self._held_back = {r.filter_id for r in rows
                               if r.state == "removed" and r.removed_by == "operator"}
        return self._installed

    async def _kernel(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the kernel's thread."""
        if fn != getattr(self.backend, "list", None):
            self._counters_at = 0.0  # a change: the next listing reads the kernel again
        with self._count_lock:
            self._in_thread += 1
        job = self._thread.submit(fn, *args)
        job.add_done_callback(self._thread_done)  # when it ends, even if nobody waits now
        return await asyncio.wrap_future(job)

    def _thread_done(self, _: object) -> None:
        with self._count_lock:
            self._in_thread -= 1

    def _install_inline(self, chosen: list[Filter]) -> bool:
        """An alert's filters into a table whose state the backend knows: one batch of ~1 ms,
        done on the loop. Through the thread it took 2.5-5 ms (two wake-ups, and every
        libnftables call of that thread gives up the interpreter lock and waits to get it
        back from the loop or the store). Not while the thread works (libnftables' context
        serves one caller); False when the thread must do it (it may have to list first)."""
        if len(chosen) > 2 or not getattr(self.backend, "knows_table", False) \
                or self._in_thread:
            return False
        assert self.backend is not None
        self._counters_at = 0.0
        try:
            self.backend.install(chosen, look=False)
        except Exception:
            return False  # the table changed behind us: the thread looks and retries
        return True

    def _error(self, what: str, exc: BaseException, **fields: Any) -> None:
        self.kernel_errors += 1
        self.last_error = f"{what}: {exc}"
        self.bus.emit("filter.error", action=what, error=str(exc), **fields)

    def _track_userspace(self, f: Filter) -> None:
        try:
            # Under the takeover action every TCP filter is checked on the takeover's queue.
            if needs_userspace(f, self.queue_mark, self.mark_mask,
                               getattr(self.backend, "tcp_action", "reject with tcp reset"),
                               getattr(self.backend, "takeover", None)):
                self.userspace.add(f)
                self._userspace_ids.add(f.filter_id)
        except Exception:
            pass

    async def install(self, filter_jsons: Iterable[dict[str, Any]], *, alert_id: str | None,
                      force: bool = False) -> list[str]:
        """Record and install filters; returns the ids newly installed (one already installed
        is left alone). Filters an operator removed are skipped (unless ``force``), with a
        ``filter.skipped`` event."""
        now = self.clock()
        expires = now + self.expire_after_s if self.expire_after_s > 0 else None
        chosen: list[Filter] = []
        records: list[asyncio.Future[str]] = []
        async with self._lock:
            installed = await self._load()
            for fj in filter_jsons:
                try:
                    f = filter_from_json(fj)
                except ValueError as e:
                    self.bus.emit("filter.error", action="decode", error=str(e),
                                  alert_id=alert_id)
                    continue
                if f.filter_id in self._held_back and not force:
                    self.bus.emit("filter.skipped", filter_id=f.filter_id, alert_id=alert_id,
                                  reason="removed by an operator earlier")
                elif f.filter_id not in installed:
                    # Queued before the kernel is asked, so the store's row precedes anything
                    # later; the kernel does not wait for it (the store's queue held 1-6 ms
                    # of every alert's path to its filter).
                    records.append(self.db.submit(
                        self.db.store.record_filter, f.to_json(), alert_id=alert_id,
                        expires=expires, force=force))
                    chosen.append(f)
                    installed.add(f.filter_id)  # a second copy in this call is unchanged
            if not chosen:
                return []
            start = time.perf_counter()
            in_kernel = True
            if self.backend is not None:
                try:
                    if not self._install_inline(chosen):
                        await self._kernel(self.backend.install, chosen)
                except Exception as e:
                    in_kernel = False
                    self._error("install", e, alert_id=alert_id,
                                filter_ids=[f.filter_id for f in chosen])
                    # The store has them: the periodic reconcile retries.
            ms = (time.perf_counter() - start) * 1000
            self._held_back.difference_update(f.filter_id for f in chosen)
            # Said when it is so (the kernel has it, or there is no kernel part), not once the
            # store's rows are written; a batch the kernel refused says filter.error instead.
            for f in chosen:
                self._track_userspace(f)
            for f in chosen if in_kernel else ():
                self.bus.emit("filter.installed", filter_id=f.filter_id, kind=f.kind,
                              service=f.service_name, proto=f.proto, port=f.port,
                              alert_id=alert_id, kernel_ms=round(ms, 3),
                              words=f.condition.describe())
            try:
                await asyncio.gather(*records)
            except BaseException:
                installed.difference_update(f.filter_id for f in chosen)  # as the store says
                raise
        return [f.filter_id for f in chosen]

    async def remove(self, filter_ids: Sequence[str], *, by: str = "operator",
                     state: str = "removed") -> list[str]:
        """Mark removed (remembered) and take out of the kernel; returns the ids that were
        installed."""
        async with self._lock:
            rows = await self.db(self.db.store.filters, state="installed")
            known = {r.filter_id for r in rows}
            ids = [i for i in dict.fromkeys(filter_ids) if i in known]
            if not ids:
                return []
            await self.db(self.db.store.mark_filters, ids, state, by)
            (await self._load()).difference_update(ids)
            if state == "removed" and by == "operator":
                self._held_back.update(ids)
            if self.backend is not None:
                try:
                    await self._kernel(self.backend.remove, ids)
                except Exception as e:
                    self._error("remove", e, filter_ids=ids)
            for i in ids:
                self.userspace.remove(i)
                self._userspace_ids.discard(i)
                self.bus.emit(f"filter.{state}", filter_id=i, by=by)
        return ids

    async def desired(self) -> list[Filter]:
        out: list[Filter] = []
        for row in await self.db(self.db.store.filters, state="installed"):
            try:
                out.append(filter_from_json(json.loads(row.json)))
            except ValueError as e:
                self.bus.emit("filter.error", action="load", filter_id=row.filter_id,
                              error=str(e))
        return out

    async def reconcile(self) -> dict[str, int]:
        """Make the kernel hold exactly the store's installed filters (one atomic batch)."""
        async with self._lock:
            self._installed = None  # the store is the truth: read it again
            await self._load()
            want = await self.desired()
            # Emptied in place: the stack's queue path holds a reference to this object.
            for fid in list(self._userspace_ids):
                self.userspace.remove(fid)
            self._userspace_ids.clear()
            for f in want:
                self._track_userspace(f)
            if self.backend is None:
                return {"desired": len(want), "added": 0, "removed": 0}
            try:
                before = {i.filter_id for i in await self._kernel(self.backend.list)}
                await self._kernel(self.backend.sync, want)
            except Exception as e:
                self._error("reconcile", e)
                return {"desired": len(want), "added": 0, "removed": 0, "error": 1}
            ids = {f.filter_id for f in want}
            added, removed = len(ids - before), len(before - ids)
            if added or removed:
                self.bus.emit("filter.reconciled", desired=len(want), added=added,
                              removed=removed)
            return {"desired": len(want), "added": added, "removed": removed}

    async def in_step(self) -> bool:
        """Whether the kernel holds the store's filters (the periodic check)."""
        if self.backend is None:
            return True
        want = {r.filter_id for r in await self.db(self.db.store.filters, state="installed")}
        try:
            have = {i.filter_id for i in await self._kernel(self.backend.list)}
        except Exception:
            return False
        return want == have

    async def expire(self) -> list[str]:
        due = await self.db(self.db.store.due_filters, self.clock())
        return await self.remove(due, by="expiry", state="expired") if due else []

    async def counters(self, max_age: float = 1.0) -> dict[str, tuple[int, int]]:
        """Packet and byte counters per installed filter (cached for ``max_age`` seconds)."""
        if self.backend is None:
            return {}
        now = self.clock()
        if now - self._counters_at >= max_age:
            try:
                rows = await self._kernel(self.backend.list)
                self._counters = {r.filter_id: (int(r.packets), int(r.bytes)) for r in rows}
            except Exception as e:
                self.last_error = f"counters: {e}"
            self._counters_at = now
        return self._counters

    async def listing(self, *, all_states: bool = False) -> list[dict[str, Any]]:
        rows = await self.db(self.db.store.filters,
                             state=None if all_states else "installed")
        counters = await self.counters()
        out = []
        for r in rows:
            d = r.to_json()
            p, b = counters.get(r.filter_id, (0, 0))
            d["packets"], d["bytes"] = p, b
            d["in_kernel"] = r.filter_id in counters if self.backend is not None else None
            d["userspace"] = r.filter_id in self._userspace_ids
            out.append(d)
        return out

    def close(self) -> None:
        self._thread.shutdown(wait=True)
