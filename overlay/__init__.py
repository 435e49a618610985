"""The overlay: authenticated Kademlia membership and a rate-limited tree broadcast of verified
alerts (DESIGN.md, "overlay/"). ``overlay.node.Overlay`` is the API the daemon uses.

Modules: ``node`` (composition and API), ``dht`` (the kademlia library hardened by
subclassing), ``hello`` (signed admission), ``mpack`` (strict RPC codec), ``kfilter`` (kernel
socket filter), ``broadcast`` (the sans-I/O broadcast core), ``antientropy``, ``seen``,
``limits`` (token buckets), ``wire`` (datagram and fetch formats), ``fetch`` (TCP bodies),
``neighbours`` (JSON neighbour cache). Imports ``sca`` (codec, keys, envelopes) only; the
sandbox verifier is injected.
"""
