"""Non-blocking HTTP/1.1 client the sidecar uses for services with no local worker.

The seed prototype called its fallback synchronously on the sidecar's only
thread, so one slow peer stalled the whole node. Here every call is a
coroutine on the sidecar's event loop, connections are kept alive and reused
per peer, and responses are parsed by `httptools`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from dpumesh.bridge_codec import HOP_BY_HOP, is_field_value, is_target, is_token


class FallbackError(Exception):
    """The peer could not be reached or answered with something that is not HTTP."""


@dataclass(frozen=True, slots=True)
class Peer:
    """An HTTP endpoint (another dpu-daemon's bridge or any server)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Peer:
        """`http://host:port` (path ignored); raises ValueError for anything else."""
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// peer URL: {url!r}")
        return cls(parts.hostname, parts.port or 80)


@dataclass(slots=True)
class _Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    complete: bool = False
    headers_done: bool = False
    keep_alive: bool = False
    parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # Ask now: llhttp resets its flags once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.complete = True


class FallbackClient:
    """Keep-alive connection pool per peer; `request` never blocks the event loop."""

    def __init__(self, max_idle_per_peer: int = 32, max_body: int = 8 << 20) -> None:
        self._idle: dict[Peer, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._max_idle = max_idle_per_peer
        self._max_body = max_body

    async def request(
        self,
        peer: Peer,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request to `peer`; returns (status, headers, body)."""
        try:
            return await asyncio.wait_for(self._request(peer, method, path, headers, body), timeout)
        except (OSError, asyncio.IncompleteReadError, httptools.HttpParserError) as exc:
            raise FallbackError(f"{peer.host}:{peer.port}: {exc}") from None

    async def _request(self, peer, method, path, headers, body):
        request = _render_request(method, path, headers, body, peer)
        # A pooled connection may have been closed by the peer since; retry once on a fresh one.
        for attempt in range(2):
            reader, writer, reused = await self._connect(peer)
            try:
                writer.write(request)
                result, keep = await self._read_response(reader)
            except (OSError, asyncio.IncompleteReadError, FallbackError):
                writer.close()
                if reused and attempt == 0:
                    continue
                raise
            if keep:
                self._release(peer, reader, writer)
            else:
                writer.close()
            return result
        raise FallbackError("unreachable")

    async def _connect(self, peer: Peer):
        idle = self._idle.get(peer)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(peer.host, peer.port)
        return reader, writer, False

    def _release(self, peer: Peer, reader, writer) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) < self._max_idle:
            idle.append((reader, writer))
        else:
            writer.close()

    async def _read_response(self, reader: asyncio.StreamReader):
        resp = _Response()
        parser = resp.parser = httptools.HttpResponseParser(resp)
        size = 0
        while not resp.complete:
            chunk = await reader.read(65536)
            if not chunk:
                if resp.headers_done and not _has_length(resp.headers):
                    break  # body delimited by connection close
                raise FallbackError("peer closed the connection mid-response")
            size += len(chunk)
            if size > self._max_body + 65536:
                raise FallbackError("response exceeds the maximum body size")
            parser.feed_data(chunk)
        status = parser.get_status_code()
        keep = resp.complete and resp.keep_alive
        headers = [(k, v) for k, v in resp.headers if k.lower() not in HOP_BY_HOP]
        return (status, headers, b"".join(resp.body)), keep

    def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for _reader, writer in conns:
                writer.close()
        self._idle.clear()


def _has_length(headers: list[tuple[str, str]]) -> bool:
    names = {k.lower() for k, _ in headers}
    return "content-length" in names or "transfer-encoding" in names


def _render_request(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes, peer: Peer
) -> bytes:
    # Workers' egress requests reach here unchecked by any HTTP parser: never write
    # something that would change the framing of the request (or start another one).
    if not is_token(method) or not is_target(path):
        raise FallbackError(f"refusing to send request line {method[:16]!r} {path[:64]!r}")
    lines = [f"{method} {path} HTTP/1.1"]
    has_host = False
    for key, value in headers:
        lower = key.lower()
        if lower in HOP_BY_HOP:
            continue
        if not is_token(key) or not is_field_value(value):
            raise FallbackError(f"refusing to send header {key[:64]!r}")
        has_host = has_host or lower == "host"
        lines.append(f"{key}: {value}")
    if not has_host:
        lines.append(f"host: {peer.host}:{peer.port}")
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
