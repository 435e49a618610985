"""Thin kernel adapters (the only place herdwall touches netfilter).

For other components (the throttle builds on these; keep them stable):

- ``marks``: ``MASK``, ``PASS``, ``QUEUE_STACK``, ``QUEUE_THROTTLE``, queue numbers ``Q_STACK``
  (0) and ``Q_THROTTLE`` (1), ``with_mark(current, value)``.
- ``nft.NftTable(netns=None)``: ``ensure()``, ``apply(commands)`` (one atomic libnftables JSON
  batch, ``NftError`` on refusal, previous ruleset intact), ``add_rule(chain, expr, comment)``
  on ``prerouting``/``input``/``forward``/``output`` (appended after the PASS rules),
  ``add_set(name, type, flags=, timeout=)``, ``add_elements``/``delete_elements``/
  ``element_cmd`` (tuples for concatenations), ``list_set``, ``counters()``, ``protect``/
  ``unprotect`` (the stack's ports), ``teardown()``. Expression helpers: ``mark_is``,
  ``set_mark``, ``in_set``, ``l4_port``, ``meta``, ``ct``, ``counter``, ``ACCEPT``, ``DROP``.
- ``queue_rules.QueueRules(netns=None, fail_open=True)``: ``install()`` (idempotent),
  ``remove()``, ``present()``: the static ``-m mark -j NFQUEUE`` rules on INPUT, FORWARD, OUTPUT.
- ``nfqueue.QueueAdapter(queue_num, on_packet, netns=None, max_len=1024, fail_open=True)``:
  ``start()``/``close()`` or ``async with``; ``on_packet(payload: bytes, handle)``;
  ``handle.accept()``, ``handle.accept(mark=M)``, ``handle.drop()``, now or later (retained).
- ``inline.StackQueue(stack, on_events)``: the stack inline on ``Q_STACK``.
- ``sockets.mark_socket(sock, mark=PASS)``: exempt the node's own sockets.
- ``passive.PassiveReader(iface, stack, on_events)``: AF_PACKET mirror mode.
"""
