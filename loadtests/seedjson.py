"""Client side of the seed's JSON protocol (DESIGN §2) - no Locust import.

The client opens a TCP connection, sends one JSON object
``{"method", "path", "headers", "body", "query_string"}`` with no framing,
reads one JSON object ``{"req_id", "status", "headers", "body"}`` back and
closes the connection: a new connection per request, as the seed's own
example client does. TCP_NODELAY is set on the socket before sending.

Under Locust the standard `socket` module is gevent's (Locust monkey-patches
at import), so these calls yield to other users while waiting.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any

MAX_REPLY_BYTES = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The server's reply was not one JSON object with an integer status."""


def encode_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: str = "",
    query_string: str = "",
) -> bytes:
    return json.dumps(
        {
            "method": method,
            "path": path,
            "headers": dict(headers),
            "body": body,
            "query_string": query_string,
        },
        separators=(",", ":"),
    ).encode("utf-8")


def _try_decode(buf: bytearray) -> dict[str, Any] | None:
    """The reply once `buf` holds a complete JSON object, else None."""
    if not buf.rstrip().endswith(b"}"):
        return None
    try:
        text = buf.decode("utf-8")
    except UnicodeDecodeError:
        return None  # a multi-byte character may be split; wait for more
    try:
        obj, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except json.JSONDecodeError:
        return None
    return obj


def exchange(host: str, port: int, payload: bytes, timeout_s: float = 60.0) -> dict[str, Any]:
    """Send one request on a new connection and return the decoded reply.

    Raises `OSError` (connect/send/receive failures, `TimeoutError`) or
    `ProtocolError` (connection closed early, reply not a JSON object with an
    integer ``status``).
    """
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(payload)
        buf = bytearray()
        reply = None
        while reply is None:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY_BYTES:
                raise ProtocolError(f"reply larger than {MAX_REPLY_BYTES} bytes")
            reply = _try_decode(buf)
    if reply is None:
        if not buf:
            raise ProtocolError("connection closed without a reply")
        raise ProtocolError(f"connection closed mid-reply: {bytes(buf[:200])!r}")
    if not isinstance(reply, dict):
        raise ProtocolError(f"reply is not a JSON object: {bytes(buf[:200])!r}")
    status = reply.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise ProtocolError(f"reply has no integer status: {bytes(buf[:200])!r}")
    return reply
