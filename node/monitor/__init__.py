"""``herdwall monitor``: a rich Live terminal view of a running node, over its control socket.

``render`` turns one status snapshot (and the events streamed since) into a renderable, with no
I/O, so it is tested on a recording console; ``app`` polls the node, follows its event stream,
reads keys and drives ``rich.live.Live``.
"""
