"""Hybrid IP traceback (seed 004): digest logging and marking on forwarding nodes, and
attack-path reconstruction from the victim.

Modules, sans-I/O first:

- ``digest``: the 20-byte invariant key of a packet (header fields that do not change in
  flight plus the first 8 payload bytes) and the router's keyed digest of it;
- ``bloom``: time-sliced, foldable Bloom filters, one table per upstream neighbour, memory
  bounded per router, at a configured false-positive rate;
- ``marking``: the per-hop rule (log, or mark the 14-bit router id and a logged flag into the
  identification field of atomic packets; the last hop clears it);
- ``config``: a router's id, links and neighbours (``RouterConfig``);
- ``core``: ``RouterCore``, the router role: ``forward()`` per packet, ``answer()`` per query;
- ``wire``: the signed ``TracebackQuery`` / ``TracebackAnswer`` messages;
- ``query``: ``PathWalk`` (the reconstruction) and ``trace()`` (drives it over a transport);

and the thin adapters: ``router`` (NFQUEUE on a router, ``RouterService``), ``transport``
(the query over UDP), ``netbed`` (router namespaces for tests, the benchmark and demos).

For the daemon: a node in router role builds ``RouterConfig.from_dict(cfg["traceback"])`` and
runs ``RouterService(RouterCore(config, node_key), netns=None)`` on its loop. A victim's node
traces with ``await trace(packet, at=..., key=node_key, gateway=RouterRef(...),
ask=UdpAsker())``; when the overlay carries the RPC, ``ask`` becomes a call that sends the query
bytes to the router's node and returns the answer bytes (the messages are signed end to end, so
any transport that moves opaque bytes will do).
"""
