"""A TCP sink for testbed checks: what each connection delivered before its client closed it."""

from __future__ import annotations

import socket
import threading


def collect_streams(listener: socket.socket, received: list[bytes],
                    read_timeout: float = 2.0) -> threading.Thread:
    """Accept connections on ``listener`` until it is closed (or its own accept timeout runs
    out), reading each to its end; append each connection's bytes to ``received`` in order.
    A connection that stalls past ``read_timeout`` or is reset counts with what came before."""

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(read_timeout)
                data = bytearray()
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                except OSError:
                    pass
                received.append(bytes(data))

    thread = threading.Thread(target=serve, name="tcp-sink", daemon=True)
    thread.start()
    return thread
