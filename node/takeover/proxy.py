"""The taken-over connection: two endpoints, a policy between them (sans-I/O).

``to_client`` impersonates the server towards the client, ``to_server`` the client towards the
server; each keeps its own sequence space, seeded so that at the moment of takeover both are the
connection's own. From then on the proxy relays bytes in order between them through the
policy, so every byte the policy removes (or inserts) shifts one side's sequence numbers against
the other's: that offset is the sequence translation (``translation``), and since each endpoint
acknowledges, retransmits and flow-controls its own side, no packet is ever rewritten in place.

Flow control crosses the proxy: a side's bytes are read only as fast as the other endpoint can
queue them, so a slow server closes the client's window and the reverse.

The client-facing endpoint can answer first: with ``defer_server`` the server-facing one is
built by ``connect_server`` after the first segments to the client are out (what it would be
sent is held meanwhile), which takes its set-up off the takeover's critical path.

Ends of stream: a FIN from one peer becomes a FIN to the other once the bytes before it are
relayed; a policy that closes finishes a side with a FIN. A reset from a peer (or an endpoint
that gave up) finishes the other side with a FIN too: the node itself never sends a reset.
"""

from __future__ import annotations

from collections import Counter

from node.takeover.policy import Policy, Verdict
from node.takeover.tcp import Config, Endpoint, Seed, Segment, State
from node.takeover.wire import build

Addr = tuple[bytes, int]  # raw IPv4 address, port


class Proxy:
    def __init__(self, client: Addr, server: Addr, to_client: Seed, to_server: Seed,
                 policy: Policy, now: float, *, config: Config | None = None,
                 idle_timeout: float = 3600.0, fin_timeout: float = 60.0,
                 defer_server: bool = False) -> None:
        self.client = client
        self.server = server
        self.policy = policy
        self.a = Endpoint(to_client, now, config)  # faces the client, as the server
        self._b_seed = to_server
        self._config = config
        self._held = bytearray()  # for the server, until its endpoint exists
        self._held_close = False
        self.b: Endpoint = None  # type: ignore[assignment]  # faces the server, as the client
        if not defer_server:
            self.connect_server(now)
        self.idle_timeout = idle_timeout
        self.fin_timeout = fin_timeout
        self.last_activity = now
        self.started = now
        self.a_shut = False  # FIN queued towards the client: server bytes are discarded
        self.b_shut = False  # FIN queued towards the server: client bytes are discarded
        self.c2s_removed = 0  # client bytes the policy dropped
        self.s2c_inserted = 0  # bytes the proxy sent the client that the server never sent
        self.stats: Counter[str] = Counter()
        self._ident = [0, 0]
        self.expired = False

    # ------------------------------------------------------------------ segments

    def start(self, trigger: Segment, now: float) -> None:
        """Take the trigger: the client segment whose bytes made the flow match (its sequence
        number is the client-facing endpoint's ``rcv_nxt``)."""
        self.a.receive(trigger, now)
        data = self.a.read(len(trigger.payload))
        self._apply(self.policy.trigger(data))
        self._pump()

    def connect_server(self, now: float) -> None:
        """Build the server-facing endpoint (see ``defer_server``)."""
        if self.b is not None:
            return
        self.b = Endpoint(self._b_seed, now, self._config)
        if self._held:
            self.b.write(bytes(self._held))
            self._held.clear()
        if self._held_close:
            self.b.shutdown()
        self._pump()

    def receive(self, from_client: bool, seg: Segment, now: float) -> None:
        self.last_activity = now
        if self.b is None:
            self.connect_server(now)
        (self.a if from_client else self.b).receive(seg, now)
        self._pump()

    def poll(self, now: float, *, flush: bool = True) -> list[tuple[bool, Segment]]:
        """Segments to transmit: ``(True, seg)`` goes to the client, ``(False, seg)`` to the
        server."""
        if self._idle(now):
            self.expired = True
            return []
        out = [(True, s) for s in self.a.poll(now, flush=flush)]
        if self.b is None:
            return out
        out += [(False, s) for s in self.b.poll(now, flush=flush)]
        if self.a.closed or self.b.closed:
            self._pump()  # a side that just closed (timer) finishes the other one
            out += [(True, s) for s in self.a.poll(now, flush=flush)]
            out += [(False, s) for s in self.b.poll(now, flush=flush)]
        return out

    def packets(self, now: float, *, flush: bool = True) -> list[tuple[bytes, bytes]]:
        """``poll`` built into IPv4 packets: ``(destination address, packet)``."""
        (caddr, cport), (saddr, sport) = self.client, self.server
        out = []
        for to_client, seg in self.poll(now, flush=flush):
            i = 0 if to_client else 1
            self._ident[i] = (self._ident[i] + 1) & 0xFFFF
            if to_client:
                out.append((caddr, build(saddr, caddr, sport, cport, seg, ident=self._ident[0])))
            else:
                out.append((saddr, build(caddr, saddr, cport, sport, seg, ident=self._ident[1])))
        return out

    def deadline(self) -> float | None:
        ds = [d for d in (self.a.deadline(), self.b and self.b.deadline()) if d is not None]
        ds.append(self.last_activity + (self.fin_timeout if self.a_shut and self.b_shut
                                        else self.idle_timeout))
        return min(ds)

    @property
    def done(self) -> bool:
        return self.expired or (self.a.closed and self.b is not None and self.b.closed)

    @property
    def translation(self) -> tuple[int, int]:
        """(client-to-server, server-to-client) offsets: a client byte at sequence number x
        (after the last edit) reaches the server at ``x - offset``; the client sees a server
        byte at y as ``y + offset``."""
        return self.c2s_removed, self.s2c_inserted

    # ------------------------------------------------------------------ relay

    def _idle(self, now: float) -> bool:
        limit = self.fin_timeout if self.a_shut and self.b_shut else self.idle_timeout
        return now - self.last_activity > limit

    def _apply(self, v: Verdict) -> None:
        if v.dropped:
            self.c2s_removed += v.dropped
            self.stats["dropped_bytes"] += v.dropped
            self.stats["dropped_chunks"] += 1
        if v.forward and not self.b_shut:
            if self.b is None:
                self._held += v.forward
            else:
                self.b.write(v.forward)
            self.stats["c2s_bytes"] += len(v.forward)
        if v.reply and not self.a_shut:
            self.a.write(v.reply)
            self.s2c_inserted += len(v.reply)
        if v.close_server:
            self._shut_b()
        if v.close_client:
            self._shut_a()

    def _shut_a(self) -> None:
        if not self.a_shut:
            self.a_shut = True
            self.a.shutdown()

    def _shut_b(self) -> None:
        if not self.b_shut:
            self.b_shut = True
            if self.b is None:
                self._held_close = True
            else:
                self.b.shutdown()

    def _pump(self) -> None:
        a, b = self.a, self.b
        if b is None:
            return  # connect_server pumps
        while a.readable():
            if self.b_shut:
                self.stats["discarded_c2s"] += len(a.read())
                continue
            space = b.send_space()
            if space <= 0:
                break
            self._apply(self.policy.client(a.read(space)))
        while b.readable():
            if self.a_shut:
                self.stats["discarded_s2c"] += len(b.read())
                continue
            space = a.send_space()
            if space <= 0:
                break
            out = self.policy.server(b.read(space))
            if out:
                a.write(out)
                self.stats["s2c_bytes"] += len(out)
        # Ends of stream cross over once the bytes before them are relayed.
        if a.eof and not a.readable():
            self._shut_b()
        if b.eof and not b.readable():
            self._shut_a()
        # A side reset by its peer or given up: finish the other side gracefully.
        if a.state == State.CLOSED and not self.b_shut:
            self.stats["client_gone"] += 1
            self._shut_b()
        if b.state == State.CLOSED and not self.a_shut:
            self.stats["server_gone"] += 1
            self._shut_a()
