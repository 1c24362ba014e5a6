"""TCP_NODELAY on FastHttpUser's connections.

Locust's `FastHttpUser` talks through geventhttpclient, which does not set
TCP_NODELAY: with Nagle's algorithm on, a request written in two segments
(headers, then body) can wait for the peer's delayed ACK (up to ~40 ms on
Linux), which would swamp the microsecond-level differences this benchmark
measures.

geventhttpclient has exactly one hook for socket options:
`ConnectionPool.after_connect(sock)`, called on every new connection (the
docstring of `ConnectionPool._create_socket` says to override it to "set
tcp/socket options"). Its `HTTPClient` builds the `ConnectionPool` itself,
so there is no class to plug in; instead `NodelayHTTPClientPool` (an
`HTTPClientPool`, the per-user factory of `HTTPClient`s) wraps the hook on
each client's pool (`HTTPClient._connection_pool`) right after creating the
client, before any connection exists. `install(session)` gives one
`FastHttpSession` such a pool with the user's own settings, so the
per-user connection behaviour of FastHttpUser is unchanged. If a future
geventhttpclient renames the private attribute, `get_client` raises instead
of silently running with Nagle on. `tests/test_locustfile.py` checks the
option on the live sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from geventhttpclient.client import HTTPClient, HTTPClientPool


def set_nodelay(sock: Any) -> None:
    """Disable Nagle's algorithm on a connected TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wrap_pool(client: HTTPClient) -> None:
    pool = getattr(client, "_connection_pool", None)
    if pool is None or not callable(getattr(pool, "after_connect", None)):
        raise RuntimeError(
            "geventhttpclient internals changed (no HTTPClient._connection_pool.after_connect): "
            "cannot set TCP_NODELAY; update loadtests/nodelay.py"
        )
    if getattr(pool, "_dpumesh_nodelay", False):
        return
    original = pool.after_connect

    def after_connect(sock: Any) -> None:
        original(sock)
        set_nodelay(sock)

    pool.after_connect = after_connect
    pool._dpumesh_nodelay = True


class NodelayHTTPClientPool(HTTPClientPool):
    """An `HTTPClientPool` whose clients set TCP_NODELAY on every connection."""

    def get_client(self, url: Any) -> HTTPClient:
        client = super().get_client(url)
        _wrap_pool(client)
        return client


def install(session: Any) -> None:
    """Replace a `FastHttpSession`'s client pool by a `NodelayHTTPClientPool`.

    Call before the session's first request (in the user's ``__init__``).
    """
    agent = session.client  # LocustUserAgent
    old = agent.clientpool
    if isinstance(old, NodelayHTTPClientPool):
        return
    if old.clients:
        raise RuntimeError("install() must run before the session's first request")
    agent.clientpool = NodelayHTTPClientPool(**old.client_args)
