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

and the thin adapters: ``router`` (NFQUEUE on a router, ``RouterService``), ``transport``
(the query over UDP: ``QueryServer``, ``UdpAsker``), ``netbed`` (router namespaces for tests,
the benchmark and demos).

For the daemon:

- Router role: ``config = RouterConfig.from_dict(cfg["traceback"])`` (see ``config`` for the
  keys), then ``RouterService(RouterCore(config, node_key), netns=None)``; ``await start()``
  on the daemon's loop installs the ``traceback`` chain in ``inet herdwall`` and one iptables
  FORWARD queue rule, binds NFQUEUE ``Q_TRACE`` and the query server; ``await stop()`` removes
  them. ``core.stats`` and ``core.store.stats`` are the numbers for a monitor.
- Victim side: ``graph = await trace(packet, at=captured_at, key=node_key,
  gateway=RouterRef(addr, key), ask=UdpAsker())``; ``graph.ingresses`` and ``graph.paths()``.
- Over the overlay: ``ask`` is any ``async (RouterRef, query_bytes) -> answer_bytes | None``
  and a router serves with ``core.answer(query_bytes, source_ip, now) -> bytes | None``. The
  messages are signed end to end with the node keys, so the overlay only has to carry opaque
  bytes to a peer and back: one request/response RPC (``rpc_traceback(sender, data)``)
  registered on the hardened protocol, plus a way to reach a router by its public key.
"""
