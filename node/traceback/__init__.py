"""Hybrid IP traceback (seed 004): digest logging and marking on forwarding nodes, and
attack-path reconstruction from the victim.

Modules, sans-I/O first:

- ``digest``: the 20-byte invariant key of a packet (header fields that do not change in
  flight plus the first 8 payload bytes) and the router's keyed digest of it;
- ``bloom``: time-sliced, foldable Bloom filters, one table per upstream neighbour, memory
  bounded per router, at a configured false-positive rate per table lookup;
- ``marking``: the per-hop rule (log, or mark the 14-bit router id and a logged flag into the
  identification field of atomic packets; the last hop clears it);
- ``config``: a router's id, links and neighbours (``RouterConfig``, ``RouterRef``);
- ``core``: ``RouterCore``, the router role: ``forward()`` per packet, ``answer()`` per query;
- ``wire``: the signed ``TracebackQuery`` / ``TracebackAnswer`` messages;
- ``query``: ``PathWalk`` (the reconstruction) and ``trace()`` (drives it over a transport);
- ``sim``: a network of cores without a kernel (tests, benchmark);

and the thin adapters: ``router`` (NFQUEUE on a router, ``RouterService``), ``rpc`` (the query
as an authenticated overlay RPC: ``QueryService`` on a router, ``OverlayAsker`` for the
victim), ``netbed`` (router namespaces with an overlay node and the router role in each, for
tests, the benchmark and demos).

For the daemon (``node.components.traceback``, ``[traceback]`` in the node config):

- Router role: ``RouterService(RouterCore(config, node_key), netns=None)``; ``await
  start()`` on the daemon's loop installs the ``traceback`` chain in ``inet herdwall`` and
  one iptables FORWARD queue rule and binds NFQUEUE ``Q_TRACE``; ``await stop()`` removes
  them. ``QueryService(overlay, core)`` answers queries on the node's overlay.
  ``core.stats`` and ``core.store.stats`` are the numbers for a monitor.
- Victim side: ``graph = await trace(packet, at=captured_at, key=node_key,
  gateway=RouterRef(overlay_addr, key), ask=OverlayAsker(overlay))``; ``graph.ingresses``
  and ``graph.paths()``. Routers are named by their overlay address and node key; each
  answer is signed by the key its downstream neighbour vouched for.
"""
