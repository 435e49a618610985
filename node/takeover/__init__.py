"""Connection takeover: a live malicious TCP connection moves into a user-level TCP endpoint pair
that goes on as a transparent proxy and removes the malicious content (Tang et al.), instead of
being reset. See ``proxy`` (the two endpoints, sequence translation and policies), ``tcp`` (the
sans-I/O endpoint), ``adapter`` (NFQUEUE + raw socket driver) and the baselines ``repair``
(TCP_REPAIR migration into the OS stack) and ``reset`` (reset injection)."""
