"""Loopback ports from the OS, never the same one twice within this process.

`free_ports` asks the kernel for ports by binding `127.0.0.1:0` and remembers
every port it hands out, so two stacks built by one process never collide.
The sockets are closed before the caller's server binds the port: in that
small window another process on the machine could take it (TOCTOU). The
kernel hands out ephemeral ports in a rotating order, so that is rare; a
server that loses the race fails to start, and the supervisor reports it.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterable

_HOST = "127.0.0.1"
_lock = threading.Lock()
_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports not handed out before by this process."""
    ports: list[int] = []
    held: list[socket.socket] = []
    with _lock:
        try:
            # Holding every socket until the end stops the kernel from
            # returning the same port twice in one call.
            while len(ports) < n:
                if len(held) > n + 1000:
                    raise RuntimeError(f"could not find {n} unused ports")
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((_HOST, 0))
                port = sock.getsockname()[1]
                if port not in _handed_out:
                    ports.append(port)
        finally:
            for sock in held:
                sock.close()
        _handed_out.update(ports)
    return ports


def release_ports(ports: Iterable[int]) -> None:
    """Let `free_ports` hand these out again (after their servers are gone)."""
    with _lock:
        _handed_out.difference_update(ports)


def port_is_free(port: int) -> bool:
    """Whether a server could bind `127.0.0.1:port` now.

    Uses SO_REUSEADDR like real servers (Envoy, gunicorn, http.server), so
    connections lingering in TIME_WAIT do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def wait_port_free(port: int, timeout_s: float = 10.0) -> None:
    """Block until `port` can be bound again (a stopped server released it)."""
    deadline = time.monotonic() + timeout_s
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still in use after {timeout_s:.1f} s")
        time.sleep(0.05)
