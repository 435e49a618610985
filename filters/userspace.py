"""User-space filter checks: the general conditions nftables cannot say, per service port.

The stack hands over each datagram, or a TCP connection's reassembled stream as it grows; the
check is ``Filter.matches``, the same condition the nft compiler translates, so both back ends
have one meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .condition import Filter


class UserspaceFilters:
    def __init__(self, filters: Iterable[Filter] = ()) -> None:
        self._by_port: dict[tuple[str, int], dict[str, Filter]] = {}
        # Told of each filter added (True) or removed (False), after the change, on the thread
        # that made it: a copy kept elsewhere follows (node.takeover.fastack).
        self.watchers: list[Callable[[Filter, bool], None]] = []
        for f in filters:
            self.add(f)

    def add(self, f: Filter) -> None:
        self._by_port.setdefault((f.proto, f.port), {})[f.filter_id] = f
        for w in self.watchers:
            w(f, True)

    def remove(self, filter_id: str) -> bool:
        gone = [f for filters in self._by_port.values()
                if (f := filters.pop(filter_id, None)) is not None]
        for f in gone:
            for w in self.watchers:
                w(f, False)
        return bool(gone)

    def __iter__(self) -> Iterator[Filter]:
        return (f for filters in list(self._by_port.values()) for f in list(filters.values()))

    def ports(self) -> set[tuple[str, int]]:
        return {k for k, v in self._by_port.items() if v}

    def __contains__(self, key: tuple[int, int]) -> bool:
        """``(IP protocol number, port) in filters``: does that port have checks (asked per
        queued packet, so no set is built)."""
        proto, port = key
        return bool(self._by_port.get(("tcp" if proto == 6 else "udp", port)))

    def check(self, proto: str, port: int, data: bytes,
              resume: dict[str, int] | None = None, *, anywhere: bool = False
              ) -> Filter | None:
        """The first filter that ``data`` (a datagram, or a stream so far) matches.
        ``resume``: the stream's scan state, per filter id, kept by the caller from one check of
        the growing stream to the next (``Filter.scan``), so no part is scanned again.
        ``anywhere``: ``data`` is a piece of a stream whose place in it is not known (past the
        bound a stream is kept to): only the filters that may hold from any position are
        asked (``Filter.anywhere``); a specific filter's offset counts from the stream's start."""
        for fid, f in self._by_port.get((proto, port), {}).items():
            if anywhere and not f.anywhere:
                continue
            if resume is None:
                if f.matches(data):
                    return f
                continue
            hit, resume[fid] = f.scan(data, resume.get(fid, 0))
            if hit:
                return f
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_port.values())
