"""Crafting TCP conversations packet by packet (tests, benchmarks), with the stack's own builders.

``TcpConversation`` keeps both sides' sequence numbers so a test can write a handshake, data in
order or not, overlaps, retransmissions, FINs and RSTs in a few lines, with Linux-like options
(MSS, SACK permitted, timestamps, window scale)."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.stack.packet import ACK, FIN, PSH, RST, SYN, TcpOptions, ip_bytes, tcp_packet


@dataclass
class TcpConversation:
    client: str = "10.77.0.2"
    server: str = "10.77.0.1"
    sport: int = 40000
    dport: int = 80
    client_isn: int = 1000
    server_isn: int = 5000
    timestamps: bool = True
    wscale: int | None = 7
    window: int = 502  # raw window after the handshake (scaled by wscale)
    ts_clock: int = 100
    server_ts: int = 0  # the server's latest TSval: client segments echo it (Linux checks the
    # TSecr of the handshake-completing ACK against the SYN/ACKs it sent)
    c_next: int = field(init=False)
    s_next: int = field(init=False)

    def __post_init__(self) -> None:
        self.c_next = (self.client_isn + 1) & 0xFFFFFFFF
        self.s_next = (self.server_isn + 1) & 0xFFFFFFFF
        self._c = ip_bytes(self.client)
        self._s = ip_bytes(self.server)

    def _ts(self, server: bool = False) -> tuple[int, int] | None:
        self.ts_clock += 1
        if not self.timestamps:
            return None
        if server:
            self.server_ts = self.ts_clock
            return self.ts_clock, self.ts_clock - 1
        return self.ts_clock, self.server_ts

    def syn(self) -> bytes:
        opts = TcpOptions(mss=1460, sack_ok=True, ts=self._ts(), wscale=self.wscale)
        return tcp_packet(self._c, self._s, self.sport, self.dport, seq=self.client_isn,
                          flags=SYN, window=64240, options=opts)

    def synack(self) -> bytes:
        opts = TcpOptions(mss=1460, sack_ok=True, ts=self._ts(True), wscale=self.wscale)
        return tcp_packet(self._s, self._c, self.dport, self.sport, seq=self.server_isn,
                          ack=self.c_next, flags=SYN | ACK, window=65160, options=opts)

    def ack(self, *, ts: tuple[int, int] | None = None) -> bytes:
        return self.to_server(b"", flags=ACK, ts=ts)

    def handshake(self) -> list[bytes]:
        return [self.syn(), self.synack(), self.ack()]

    def to_server(self, data: bytes, *, seq: int | None = None, flags: int = ACK | PSH,
                  ts: tuple[int, int] | None = None, advance: bool = True,
                  window: int | None = None) -> bytes:
        """A client segment; ``seq`` relative to the stream start (offset 0 = first byte)
        when given, else the next in order."""
        s = self.c_next if seq is None else (self.client_isn + 1 + seq) & 0xFFFFFFFF
        opts = TcpOptions(ts=ts if ts is not None else self._ts()) if self.timestamps else None
        pkt = tcp_packet(self._c, self._s, self.sport, self.dport, seq=s, ack=self.s_next,
                         flags=flags if data or flags != ACK | PSH else ACK,
                         window=self.window if window is None else window, options=opts,
                         payload=data)
        if advance and seq is None:
            self.c_next = (self.c_next + len(data) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        return pkt

    def to_client(self, data: bytes = b"", *, flags: int = ACK, ack: int | None = None,
                  window: int | None = None) -> bytes:
        """A server segment acknowledging ``ack`` (stream offset) or everything so far."""
        a = self.c_next if ack is None else (self.client_isn + 1 + ack) & 0xFFFFFFFF
        opts = TcpOptions(ts=self._ts(True)) if self.timestamps else None
        pkt = tcp_packet(self._s, self._c, self.dport, self.sport, seq=self.s_next, ack=a,
                         flags=flags, window=self.window if window is None else window,
                         options=opts, payload=data)
        self.s_next = (self.s_next + len(data) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        return pkt

    def client_fin(self) -> bytes:
        return self.to_server(b"", flags=FIN | ACK)

    def server_fin(self) -> bytes:
        return self.to_client(b"", flags=FIN | ACK)

    def client_rst(self, seq: int | None = None) -> bytes:
        s = self.c_next if seq is None else seq
        return tcp_packet(self._c, self._s, self.sport, self.dport, seq=s, flags=RST,
                          window=0)
