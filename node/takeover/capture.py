"""Packet timestamps on an interface, both directions, with ``tcpdump`` (benchmarks).

The benchmark times a takeover from the trigger packet arriving at the node to the first
segment the new owner emits, both seen on the node's client-facing interface: one capture, one
clock (the kernel's timestamp when a packet passes the interface's packet taps: on arrival for
incoming packets, at transmit for outgoing ones), in nanoseconds. tcpdump runs as a process of
its own inside the node's namespace, so capturing does not compete with the node for its
interpreter.
"""

from __future__ import annotations

import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PCAP_NS_MAGIC = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
BLOCK_TIMEOUT = 1.2  # s: tcpdump's capture timeout (1 s), and a margin


@dataclass(slots=True)
class Captured:
    t: float  # seconds (CLOCK_REALTIME)
    src: bytes
    dst: bytes
    sport: int
    dport: int
    flags: int
    seq: int
    payload: bytes  # the first bytes of the TCP payload


class Tcpdump:
    """``tcpdump -i IFACE tcp port PORT`` in namespace ``netns``, to a pcap file."""

    def __init__(self, netns: str, iface: str, port: int, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "-s", "128",
             "-B", "8192", "--time-stamp-precision=nano", "-w", str(path),
             f"tcp port {port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # it writes the file header once listening
            if path.exists() and path.stat().st_size >= 24:
                break
            time.sleep(0.02)
        else:
            self.close()
            raise RuntimeError("tcpdump did not start")
        time.sleep(0.1)

    def close(self) -> list[Captured]:
        if self.proc.poll() is None:
            # libpcap hands tcpdump a block of its capture ring when the block is full or its
            # timeout (tcpdump's: 1 s) expires, and a terminated tcpdump drops the block it has
            # not been given: without this wait the last second's packets were lost (a short
            # run captured none, a benchmark path fewer timed takeovers than it made).
            time.sleep(BLOCK_TIMEOUT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return read_pcap(self.path) if self.path.exists() else []


def read_pcap(path: Path) -> list[Captured]:
    """IPv4 TCP packets of an Ethernet pcap with nanosecond timestamps."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic, = struct.unpack_from("<I", data)
    if magic != PCAP_NS_MAGIC:
        raise ValueError("expected a little-endian nanosecond pcap")
    link, = struct.unpack_from("<I", data, 20)
    if link != LINKTYPE_ETHERNET:
        raise ValueError(f"link type {link}")
    out = []
    off = 24
    while off + 16 <= len(data):
        sec, nsec, incl, _orig = struct.unpack_from("<IIII", data, off)
        off += 16
        frame = data[off:off + incl]
        off += incl
        if len(frame) < 14 + 40 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        if ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        sport, dport, seq = struct.unpack_from("!HHI", ip, ihl)
        doff = (ip[ihl + 12] >> 4) * 4
        out.append(Captured(sec + nsec * 1e-9, bytes(ip[12:16]), bytes(ip[16:20]), sport,
                            dport, ip[ihl + 13], seq, bytes(ip[ihl + doff:])))
    return out


def trigger_times(packets: list[Captured], prefix: bytes, client: bytes
                  ) -> list[tuple[float, float]]:
    """For each packet from ``client`` whose payload starts with ``prefix`` (first copy only:
    not a retransmission), the time it arrived and the time of the first packet of the same
    connection towards ``client`` after it (other connections' packets do not count)."""
    out = []
    seen: set[tuple[int, int]] = set()
    pending: tuple[float, int] | None = None
    for p in packets:
        if p.src == client and p.payload.startswith(prefix):
            if (p.sport, p.seq) in seen:
                continue
            seen.add((p.sport, p.seq))
            pending = (p.t, p.sport)
        elif pending is not None and p.dst == client and p.dport == pending[1]:
            out.append((pending[0], p.t))
            pending = None
    return out
