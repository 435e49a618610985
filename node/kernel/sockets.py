"""The node's own sockets carry the PASS mark (``SO_MARK``), so ``inet herdwall`` neither
queues nor throttles them, nor the replies of their connections (the output chain copies the
mark into the conntrack mark and prerouting restores it; see ``node.kernel.nft``)."""

from __future__ import annotations

import socket

from node.kernel.marks import PASS

SO_MARK = getattr(socket, "SO_MARK", 36)


def mark_socket(sock: socket.socket, mark: int = PASS) -> socket.socket:
    """Set ``SO_MARK`` on ``sock`` (needs CAP_NET_ADMIN); return it for chaining."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    return sock


def socket_mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_MARK)
