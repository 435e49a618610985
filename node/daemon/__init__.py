"""The node daemon: config, store, events, the alert pipeline, the control socket, and the
asyncio process that composes them (``node.daemon.node``).

Module map:

- ``config``: the TOML config, embedded defaults, validation naming the bad key;
- ``store``: the SQLite (WAL) store of alerts, verdicts, filters, peers, events, throttle flags;
- ``events``: the in-process event bus, the JSON-lines event log, per-second rate series;
- ``metrics``: the optional Prometheus endpoint;
- ``worker``: what runs in the sandbox process pools (one Detector/Verifier per service each);
- ``sampler`` and ``pipeline``: detection and receiving of alerts;
- ``filters``: the node's filters, store and kernel kept in step;
- ``control``: the Unix control socket, server and client;
- ``components``: the interfaces the stack, throttle and overlay plug in through;
- ``node``: the daemon itself (``herdwall node run``).
"""
